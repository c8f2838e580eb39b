//! Parsing a job request into a [`JobSpec`], once, naming every bad field.
//!
//! The body is read with a hand-written serde visitor rather than into a
//! `serde_json::Value`: a 10,000,000-number list then costs 80 MB as `i64`s
//! instead of gigabytes as JSON values, and every bad number is reported with
//! its index without stopping at the first.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::numbers::{RangeSpec, MAX_ABS};
use super::split::{chunk_count, split, ChunkPlan};
use super::RequestEcho;

/// How many field errors one answer lists at most; the rest are counted.
const MAX_REPORTED_ERRORS: usize = 50;
/// Metadata bounds: keys per job, bytes per key and per value.
const MAX_METADATA_KEYS: usize = 16;
const MAX_METADATA_KEY_BYTES: usize = 64;
const MAX_METADATA_VALUE_BYTES: usize = 1024;

/// Server limits that a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Cores a job gets when it does not ask (the node's core budget).
    pub default_cores: u32,
    pub max_cores_per_job: u32,
    pub max_numbers: u64,
    pub max_chunks: u64,
    /// Per-item bounds of `simulate`.
    pub max_sleep_ms: u64,
    pub max_spin: u64,
}

/// How the chunks of a job are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One thread, all chunks in turn: the baseline.
    Sequential,
    /// A pool of `cores` OS threads pulling chunks.
    Threads,
    /// `cores` worker subprocesses pulling chunks.
    Processes,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Sequential => "sequential",
            Strategy::Threads => "threads",
            Strategy::Processes => "processes",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sequential" => Some(Strategy::Sequential),
            "threads" => Some(Strategy::Threads),
            "processes" => Some(Strategy::Processes),
            _ => None,
        }
    }
}

/// How worker subprocesses hand results back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Workers write squares into memory shared with the server.
    SharedMemory,
    /// Workers send squares through their stdout pipe.
    Pipe,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::SharedMemory => "shared_memory",
            Transport::Pipe => "pipe",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "shared_memory" => Some(Transport::SharedMemory),
            "pipe" => Some(Transport::Pipe),
            _ => None,
        }
    }
}

/// Artificial per-item work, like the seed's `time.sleep(1)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Simulate {
    /// Milliseconds slept per number (models I/O-bound work).
    #[serde(default)]
    pub sleep_ms: u64,
    /// Busy-loop iterations per number (models CPU-bound work).
    #[serde(default)]
    pub spin: u64,
}

/// The numbers of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    List(Vec<i64>),
    Range(RangeSpec),
}

/// A validated job request. Everything downstream takes this type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub input: Input,
    pub count: u64,
    /// Cores as asked (or the default).
    pub cores: u32,
    pub strategy: Strategy,
    pub chunk_size: Option<u64>,
    /// Set exactly when `strategy` is `processes`.
    pub transport: Option<Transport>,
    pub simulate: Simulate,
    pub priority: i32,
    pub timeout_ms: Option<u64>,
    pub max_attempts: u32,
    pub callback_url: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// One bad field: `field` is a path such as `numbers[3]` or `range.step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// Why a request body is not a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// Not JSON at all (400).
    Malformed(String),
    /// More numbers than the server takes (413).
    TooLarge(FieldError),
    /// JSON, but invalid: every bad field (422). `more` counts unlisted errors.
    Invalid { errors: Vec<FieldError>, more: usize },
}

impl JobSpec {
    /// Parses and validates a request body against the server's limits.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<JobSpec, SpecError> {
        let raw: RawRequest = serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => SpecError::Invalid {
                errors: vec![FieldError::new("(body)", format!("must be a job request object: {e}"))],
                more: 0,
            },
            _ => SpecError::Malformed(e.to_string()),
        })?;
        raw.validate(limits)
    }

    /// How many workers the default split is for: one for `sequential`.
    fn split_workers(&self) -> u64 {
        match self.strategy {
            Strategy::Sequential => 1,
            _ => u64::from(self.cores),
        }
    }

    /// The job's chunks.
    pub fn chunks(&self) -> Vec<ChunkPlan> {
        split(self.count, self.split_workers(), self.chunk_size)
    }

    /// The request as the job document echoes it.
    pub fn echo(&self) -> RequestEcho {
        let chunks = chunk_count(self.count, self.split_workers(), self.chunk_size);
        RequestEcho {
            count: self.count,
            cores: self.cores,
            strategy: self.strategy,
            chunk_size: self.chunk_size.unwrap_or_else(|| self.count.div_ceil(chunks.max(1))),
            transport: self.transport,
            simulate: (self.simulate != Simulate::default()).then_some(self.simulate),
            range: match &self.input {
                Input::Range(r) => Some(*r),
                Input::List(_) => None,
            },
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            callback_url: self.callback_url.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// The request as it arrived: `numbers` already decoded, the small fields
/// kept as JSON values so that each can be checked and named on its own.
#[derive(Default)]
struct RawRequest {
    numbers: Option<RawNumbers>,
    fields: BTreeMap<&'static str, Value>,
    unknown: Vec<String>,
}

const FIELDS: &[&str] = &[
    "range",
    "cores",
    "strategy",
    "chunk_size",
    "transport",
    "simulate",
    "priority",
    "timeout_ms",
    "max_attempts",
    "callback_url",
    "metadata",
];

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRequest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRequest, A::Error> {
                let mut raw = RawRequest::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "numbers" {
                        raw.numbers = Some(map.next_value()?);
                    } else if let Some(name) = FIELDS.iter().find(|f| **f == key) {
                        raw.fields.insert(name, map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                        raw.unknown.push(key);
                    }
                }
                Ok(raw)
            }
        }
        d.deserialize_map(V)
    }
}

/// `numbers` decoded element by element. Bad elements are recorded with
/// their index; decoding stops keeping values past `MAX_KEPT` to bound memory
/// (the count still tells the truth, and the request is refused as too large).
#[derive(Default)]
struct RawNumbers {
    values: Vec<i64>,
    count: u64,
    not_an_array: Option<&'static str>,
    errors: Vec<FieldError>,
    more_errors: usize,
}

/// A hard cap on numbers kept while decoding, above any sane `--max-numbers`.
const MAX_KEPT: u64 = 1 << 31;

enum Item {
    Int(i128),
    Bad(String),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Item, E> {
                Ok(Item::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Item, E> {
                Ok(Item::Int(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Item, E> {
                Ok(Item::Bad(format!("{v} is not an integer in range")))
            }
            fn visit_str<E>(self, _: &str) -> Result<Item, E> {
                Ok(Item::Bad("must be an integer, not a string".into()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Item, E> {
                Ok(Item::Bad("must be an integer, not a boolean".into()))
            }
            fn visit_unit<E>(self) -> Result<Item, E> {
                Ok(Item::Bad("must be an integer, not null".into()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::Bad("must be an integer, not an array".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Item::Bad("must be an integer, not an object".into()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawNumbers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn wrong(what: &'static str) -> RawNumbers {
                RawNumbers { not_an_array: Some(what), ..RawNumbers::default() }
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = RawNumbers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNumbers, A::Error> {
                let mut out = RawNumbers::default();
                out.values.reserve(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(item) = seq.next_element::<Item>()? {
                    let index = out.count;
                    out.count += 1;
                    let problem = match item {
                        Item::Int(n) if n.abs() <= i128::from(MAX_ABS) => {
                            if out.count <= MAX_KEPT {
                                out.values.push(n as i64);
                            }
                            continue;
                        }
                        Item::Int(n) => format!("{n} is outside ±{MAX_ABS} (its square would not fit in 64 bits)"),
                        Item::Bad(message) => message,
                    };
                    if out.errors.len() < MAX_REPORTED_ERRORS {
                        out.errors.push(FieldError::new(format!("numbers[{index}]"), problem));
                    } else {
                        out.more_errors += 1;
                    }
                }
                Ok(out)
            }
            fn visit_i64<E>(self, _: i64) -> Result<RawNumbers, E> {
                Ok(V::wrong("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawNumbers, E> {
                Ok(V::wrong("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawNumbers, E> {
                Ok(V::wrong("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<RawNumbers, E> {
                Ok(V::wrong("a string"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<RawNumbers, E> {
                Ok(V::wrong("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<RawNumbers, E> {
                Ok(V::wrong("null"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawNumbers, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(V::wrong("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Collects field errors while the fields are checked one by one.
#[derive(Default)]
struct Errors {
    list: Vec<FieldError>,
    more: usize,
}

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        if self.list.len() < MAX_REPORTED_ERRORS {
            self.list.push(FieldError::new(field, message));
        } else {
            self.more += 1;
        }
    }
}

/// A JSON value as an integer within `min..=max`, or the reason it is not.
fn int_in(value: &Value, min: i128, max: i128) -> Result<i128, String> {
    let n = match value {
        Value::Number(n) => n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)),
        _ => None,
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(match (min, max) {
            (min, max) if max == i128::from(i64::MAX) => format!("{n} must be at least {min}"),
            _ => format!("{n} must be between {min} and {max}"),
        }),
        None => Err(format!("must be an integer, not {}", describe(value))),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("{n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl RawRequest {
    fn validate(mut self, limits: &Limits) -> Result<JobSpec, SpecError> {
        let mut errs = Errors::default();
        let mut unknown = std::mem::take(&mut self.unknown);
        unknown.sort();
        for key in unknown {
            errs.add(key, "is not a known field");
        }
        let field = |name: &str| self.fields.get(name).filter(|v| !v.is_null());

        // The numbers: exactly one of `numbers` / `range`.
        let range_value = field("range");
        let input = match (self.numbers.take(), range_value) {
            (Some(_), Some(_)) => {
                errs.add("range", "give exactly one of numbers or range, not both");
                None
            }
            (None, None) => {
                errs.add("numbers", "is required (or give a range)");
                None
            }
            (Some(nums), None) => {
                if let Some(what) = nums.not_an_array {
                    errs.add("numbers", format!("must be an array of integers, not {what}"));
                    None
                } else if nums.count > limits.max_numbers {
                    return Err(SpecError::TooLarge(FieldError::new(
                        "numbers",
                        format!("{} numbers is more than this server's limit of {}", nums.count, limits.max_numbers),
                    )));
                } else if nums.count == 0 {
                    errs.add("numbers", "must not be empty");
                    None
                } else {
                    let ok = nums.errors.is_empty();
                    errs.more += nums.more_errors;
                    for e in nums.errors {
                        errs.add(e.field, e.message);
                    }
                    ok.then_some(Input::List(nums.values))
                }
            }
            (None, Some(range)) => parse_range(range, limits, &mut errs)?,
        };

        let cores = match field("cores") {
            None => Some(limits.default_cores.max(1)),
            Some(v) => match int_in(v, 1, i128::from(limits.max_cores_per_job)) {
                Ok(n) => Some(n as u32),
                Err(m) => {
                    errs.add("cores", format!("{m} (this server's --max-cores-per-job)"));
                    None
                }
            },
        };
        let strategy = match field("strategy") {
            None => Some(Strategy::Threads),
            Some(Value::String(s)) => Strategy::parse(s).or_else(|| {
                errs.add("strategy", format!("{s:?} is not one of sequential, threads, processes"));
                None
            }),
            Some(v) => {
                errs.add("strategy", format!("must be a string, not {}", describe(v)));
                None
            }
        };
        let chunk_size = field("chunk_size").and_then(|v| match int_in(v, 1, i128::from(i64::MAX)) {
            Ok(n) => Some(n as u64),
            Err(m) => {
                errs.add("chunk_size", m);
                None
            }
        });
        let transport = match (field("transport"), strategy) {
            (None, Some(Strategy::Processes)) => Some(Transport::SharedMemory),
            (None, _) => None,
            (Some(Value::String(s)), strategy) => match Transport::parse(s) {
                None => {
                    errs.add("transport", format!("{s:?} is not one of shared_memory, pipe"));
                    None
                }
                Some(t) if strategy == Some(Strategy::Processes) => Some(t),
                Some(_) => {
                    errs.add("transport", "applies only to strategy \"processes\"");
                    None
                }
            },
            (Some(v), _) => {
                errs.add("transport", format!("must be a string, not {}", describe(v)));
                None
            }
        };
        let simulate = match field("simulate") {
            None => Simulate::default(),
            Some(Value::Object(map)) => {
                let mut sim = Simulate::default();
                for (key, v) in map {
                    let (slot, max) = match key.as_str() {
                        "sleep_ms" => (&mut sim.sleep_ms, limits.max_sleep_ms),
                        "spin" => (&mut sim.spin, limits.max_spin),
                        _ => {
                            errs.add(format!("simulate.{key}"), "is not a known field");
                            continue;
                        }
                    };
                    match int_in(v, 0, i128::from(max)) {
                        Ok(n) => *slot = n as u64,
                        Err(m) => errs.add(format!("simulate.{key}"), m),
                    }
                }
                sim
            }
            Some(v) => {
                errs.add("simulate", format!("must be an object, not {}", describe(v)));
                Simulate::default()
            }
        };
        let priority = field("priority").map_or(0, |v| match int_in(v, i32::MIN.into(), i32::MAX.into()) {
            Ok(n) => n as i32,
            Err(m) => {
                errs.add("priority", m);
                0
            }
        });
        let timeout_ms = field("timeout_ms").and_then(|v| match int_in(v, 1, i128::from(i64::MAX)) {
            Ok(n) => Some(n as u64),
            Err(m) => {
                errs.add("timeout_ms", m);
                None
            }
        });
        let max_attempts = field("max_attempts").map_or(1, |v| match int_in(v, 1, 10) {
            Ok(n) => n as u32,
            Err(m) => {
                errs.add("max_attempts", m);
                1
            }
        });
        let callback_url = match field("callback_url") {
            None => None,
            Some(Value::String(s)) if s.starts_with("http://") || s.starts_with("https://") => Some(s.clone()),
            Some(Value::String(_)) => {
                errs.add("callback_url", "must be an http:// or https:// URL");
                None
            }
            Some(v) => {
                errs.add("callback_url", format!("must be a string, not {}", describe(v)));
                None
            }
        };
        let metadata = match field("metadata") {
            None => BTreeMap::new(),
            Some(Value::Object(map)) => {
                if map.len() > MAX_METADATA_KEYS {
                    errs.add("metadata", format!("has {} keys; at most {MAX_METADATA_KEYS}", map.len()));
                }
                let mut out = BTreeMap::new();
                for (key, v) in map {
                    if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
                        errs.add(
                            format!("metadata.{key}"),
                            format!("keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"),
                        );
                    }
                    match v {
                        Value::String(s) if s.len() <= MAX_METADATA_VALUE_BYTES => {
                            out.insert(key.clone(), s.clone());
                        }
                        Value::String(_) => errs.add(
                            format!("metadata.{key}"),
                            format!("values must be at most {MAX_METADATA_VALUE_BYTES} bytes"),
                        ),
                        v => errs.add(format!("metadata.{key}"), format!("must be a string, not {}", describe(v))),
                    }
                }
                out
            }
            Some(v) => {
                errs.add("metadata", format!("must be an object of strings, not {}", describe(v)));
                BTreeMap::new()
            }
        };

        if let (Some(input), Some(cores), Some(strategy), true) = (&input, cores, strategy, errs.list.is_empty()) {
            let count = match input {
                Input::List(v) => v.len() as u64,
                Input::Range(r) => r.count(),
            };
            let spec = JobSpec {
                input: input.clone(),
                count,
                cores,
                strategy,
                chunk_size,
                transport,
                simulate,
                priority,
                timeout_ms,
                max_attempts,
                callback_url,
                metadata,
            };
            let chunks = chunk_count(count, spec.split_workers(), chunk_size);
            if chunks > limits.max_chunks {
                let field = if chunk_size.is_some() { "chunk_size" } else { "cores" };
                errs.add(
                    field,
                    format!("makes {chunks} chunks; this server runs at most {} per job", limits.max_chunks),
                );
            } else {
                return Ok(spec);
            }
        }
        Err(SpecError::Invalid { errors: errs.list, more: errs.more })
    }
}

fn parse_range(value: &Value, limits: &Limits, errs: &mut Errors) -> Result<Option<Input>, SpecError> {
    let Value::Object(map) = value else {
        errs.add("range", format!("must be an object {{start, end, step}}, not {}", describe(value)));
        return Ok(None);
    };
    let before = errs.list.len() + errs.more;
    let mut get = |name: &str, default: Option<i64>| match map.get(name) {
        None | Some(Value::Null) => {
            if default.is_none() {
                errs.add(format!("range.{name}"), "is required");
            }
            default
        }
        Some(v) => match int_in(v, i64::MIN.into(), i64::MAX.into()) {
            Ok(n) => Some(n as i64),
            Err(m) => {
                errs.add(format!("range.{name}"), m);
                None
            }
        },
    };
    let (start, end, step) = (get("start", None), get("end", None), get("step", Some(1)));
    for key in map.keys().filter(|k| !["start", "end", "step"].contains(&k.as_str())) {
        errs.add(format!("range.{key}"), "is not a known field");
    }
    let (Some(start), Some(end), Some(step)) = (start, end, step) else {
        return Ok(None);
    };
    if step == 0 {
        errs.add("range.step", "must not be zero");
        return Ok(None);
    }
    let range = RangeSpec { start, end, step };
    let count = range.count();
    if count == 0 {
        errs.add("range", format!("range({start}, {end}, {step}) is empty"));
        return Ok(None);
    }
    if count > limits.max_numbers {
        return Err(SpecError::TooLarge(FieldError::new(
            "range",
            format!("{count} numbers is more than this server's limit of {}", limits.max_numbers),
        )));
    }
    if start.unsigned_abs() > MAX_ABS as u64 {
        errs.add("range.start", format!("{start} is outside ±{MAX_ABS} (its square would not fit in 64 bits)"));
    }
    let last = range.last().unwrap_or(start);
    if last.unsigned_abs() > MAX_ABS as u64 {
        errs.add(
            "range.end",
            format!("the range reaches {last}, outside ±{MAX_ABS} (its square would not fit in 64 bits)"),
        );
    }
    Ok((errs.list.len() + errs.more == before).then_some(Input::Range(range)))
}

/// `POST /v1/jobs` body, for the OpenAPI document (the parser above is the truth).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"range": {"start": 0, "end": 5000}, "cores": 4, "strategy": "processes"}))]
pub struct JobRequestDoc {
    /// The numbers to square; exactly one of `numbers` / `range`. Each |n| ≤ 3,037,000,499.
    #[schema(nullable = false)]
    pub numbers: Option<Vec<i64>>,
    pub range: Option<RangeDoc>,
    /// Cores to use (≥ 1, ≤ `--max-cores-per-job`); default: the node's core budget.
    #[schema(minimum = 1)]
    pub cores: Option<u32>,
    /// Default `threads`.
    pub strategy: Option<Strategy>,
    /// Numbers per chunk; default: the seed's even split over `cores` workers.
    #[schema(minimum = 1)]
    pub chunk_size: Option<u64>,
    /// Only with `processes`; default `shared_memory`.
    pub transport: Option<Transport>,
    pub simulate: Option<Simulate>,
    /// Higher runs first; FIFO within a priority. Default 0.
    pub priority: Option<i32>,
    /// Deadline from start, in milliseconds.
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
    /// 1 to 10; default 1.
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: Option<u32>,
    /// http(s) URL POSTed the final job document.
    pub callback_url: Option<String>,
    /// At most 16 string keys (1–64 bytes) with string values (≤ 1024 bytes).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A Python-style half-open range.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RangeDoc {
    pub start: i64,
    pub end: i64,
    /// Not zero; may be negative. Default 1.
    pub step: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            default_cores: 2,
            max_cores_per_job: 1024,
            max_numbers: 1000,
            max_chunks: 100,
            max_sleep_ms: 1000,
            max_spin: 1_000_000,
        }
    }

    fn parse(body: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(body.as_bytes(), &limits())
    }

    fn invalid_fields(body: &str) -> Vec<String> {
        match parse(body) {
            Err(SpecError::Invalid { errors, .. }) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected 422 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_list_gets_the_defaults() {
        let spec = parse(r#"{"numbers": [1, -2, 3]}"#).unwrap();
        assert_eq!(spec.input, Input::List(vec![1, -2, 3]));
        assert_eq!((spec.count, spec.cores, spec.strategy), (3, 2, Strategy::Threads));
        assert_eq!((spec.transport, spec.max_attempts, spec.priority), (None, 1, 0));
    }

    #[test]
    fn processes_default_to_shared_memory() {
        let spec = parse(r#"{"numbers": [1], "strategy": "processes"}"#).unwrap();
        assert_eq!(spec.transport, Some(Transport::SharedMemory));
    }

    #[test]
    fn a_square_that_overflows_is_rejected_with_its_index() {
        assert_eq!(invalid_fields(r#"{"numbers": [1, 2, 3, 4000000000, -3037000500]}"#), ["numbers[3]", "numbers[4]"]);
        assert!(parse(r#"{"numbers": [3037000499, -3037000499]}"#).is_ok());
    }

    #[test]
    fn every_bad_field_is_named() {
        let fields = invalid_fields(
            r#"{"numbers": [1, "x", 2.5, null], "cores": 0, "strategy": "fibers", "transport": "pipe",
                "priority": "high", "max_attempts": 11, "bogus": 1, "metadata": {"a": 1}, "simulate": {"sleep_ms": -1}}"#,
        );
        assert_eq!(
            fields,
            [
                "bogus",
                "numbers[1]",
                "numbers[2]",
                "numbers[3]",
                "cores",
                "strategy",
                "transport",
                "simulate.sleep_ms",
                "priority",
                "max_attempts",
                "metadata.a"
            ]
        );
    }

    #[test]
    fn transport_needs_processes() {
        assert_eq!(invalid_fields(r#"{"numbers": [1], "strategy": "threads", "transport": "pipe"}"#), ["transport"]);
    }

    #[test]
    fn numbers_and_range_are_exclusive_and_one_is_required() {
        assert_eq!(invalid_fields(r#"{"numbers": [1], "range": {"start": 0, "end": 2}}"#), ["range"]);
        assert_eq!(invalid_fields(r#"{}"#), ["numbers"]);
        assert_eq!(invalid_fields(r#"{"numbers": []}"#), ["numbers"]);
        assert_eq!(invalid_fields(r#"{"numbers": 5}"#), ["numbers"]);
    }

    #[test]
    fn ranges_follow_python_and_are_bounded() {
        let spec = parse(r#"{"range": {"start": 10, "end": 0, "step": -3}}"#).unwrap();
        assert_eq!(spec.count, 4);
        assert_eq!(invalid_fields(r#"{"range": {"start": 0, "end": 10, "step": 0}}"#), ["range.step"]);
        assert_eq!(invalid_fields(r#"{"range": {"start": 0, "end": -10}}"#), ["range"]);
        assert_eq!(invalid_fields(r#"{"range": {"end": 10}}"#), ["range.start"]);
        assert_eq!(invalid_fields(r#"{"range": {"start": 3037000000, "end": 3037000600, "step": 1}}"#), ["range.end"]);
    }

    #[test]
    fn too_many_numbers_is_413_not_422() {
        assert!(matches!(parse(r#"{"range": {"start": 0, "end": 1001}}"#), Err(SpecError::TooLarge(_))));
        let many = format!("{{\"numbers\": [{}]}}", vec!["1"; 1001].join(","));
        assert!(matches!(parse(&many), Err(SpecError::TooLarge(_))));
    }

    #[test]
    fn too_many_chunks_names_chunk_size() {
        assert_eq!(invalid_fields(r#"{"range": {"start": 0, "end": 1000}, "chunk_size": 1}"#), ["chunk_size"]);
    }

    #[test]
    fn broken_json_is_malformed_and_a_non_object_is_invalid() {
        assert!(matches!(parse(r#"{"numbers": [1,"#), Err(SpecError::Malformed(_))));
        assert_eq!(invalid_fields("[1, 2]"), ["(body)"]);
    }

    #[test]
    fn the_echo_reports_the_effective_chunk_size() {
        let spec = parse(r#"{"range": {"start": 0, "end": 1000}, "cores": 4, "strategy": "processes"}"#).unwrap();
        assert_eq!(spec.echo().chunk_size, 250);
        let spec = parse(r#"{"numbers": [1,2,3,4,5,6,7,8,9,10], "cores": 3}"#).unwrap();
        assert_eq!(spec.chunks().iter().map(|c| c.len).collect::<Vec<_>>(), [4, 3, 3]);
    }

    proptest::proptest! {
        #[test]
        fn no_body_makes_the_parser_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = JobSpec::parse(&body, &limits());
        }

        #[test]
        fn any_valid_list_round_trips(nums in proptest::collection::vec(-MAX_ABS..=MAX_ABS, 1..200)) {
            let body = serde_json::to_vec(&serde_json::json!({"numbers": nums})).unwrap();
            let spec = JobSpec::parse(&body, &limits()).unwrap();
            proptest::prop_assert_eq!(spec.input, Input::List(nums));
        }
    }
}

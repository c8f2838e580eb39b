-- squared's schema (SQLite). Times are Unix epoch microseconds.
-- A job owns chunks (the unit of scheduling and of claiming, each with its own
-- state and lease) and result segments (the unit of storage: at most 65,536
-- squares each, little-endian i64 bytes). A chunk is 'done' only once all its
-- segments are stored, so a restart or a rescue re-runs exactly the chunks
-- that are not.

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,            -- UUID v7, so ids sort by creation
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,                     -- first claim of a chunk
    finished_at     INTEGER,
    count           INTEGER NOT NULL,
    cores           INTEGER NOT NULL,            -- as asked: chunks running at once, cluster-wide
    strategy        TEXT NOT NULL,
    transport       TEXT,
    sleep_ms        INTEGER NOT NULL DEFAULT 0,
    spin            INTEGER NOT NULL DEFAULT 0,
    range_start     INTEGER,                     -- the range, for range jobs; list jobs
    range_end       INTEGER,                     -- keep their numbers in job_inputs
    range_step      INTEGER,
    chunks_total    INTEGER NOT NULL,
    chunks_done     INTEGER NOT NULL DEFAULT 0,
    chunks_ready    INTEGER NOT NULL,            -- pending chunks, claimable now
    chunks_running  INTEGER NOT NULL DEFAULT 0,
    numbers_done    INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,  -- 1 from the first start, +1 per retry after a worker crash
    max_attempts    INTEGER NOT NULL DEFAULT 1,
    attempt_errors  TEXT NOT NULL DEFAULT '[]',  -- each failed attempt's error (JSON array)
    timeout_ms      INTEGER,
    callback_url    TEXT,                        -- POSTed the final document when the job ends
    series          TEXT,                        -- jobs of one series (a comparison) run one at a time
    request_id      TEXT,                        -- x-request-id of the submission, for the job's logs
    version         INTEGER NOT NULL DEFAULT 0,  -- bumped on every change: the event stream's ids
    request         TEXT NOT NULL,               -- the request echo (JSON)
    timing          TEXT,                        -- totals (JSON), once the job has ended
    error           TEXT                         -- problem document (JSON)
);

-- Claimable work: highest priority first, then oldest.
CREATE INDEX jobs_ready ON jobs (priority DESC, created_at, id) WHERE chunks_ready > 0 AND status IN ('queued', 'running');
CREATE INDEX jobs_queued ON jobs (status) WHERE status = 'queued';
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_series ON jobs (series, status) WHERE series IS NOT NULL;

CREATE TABLE job_metadata (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_metadata_lookup ON job_metadata (key, value, job_id);

-- A list job's numbers, in segments starting at multiples of 65,536.
CREATE TABLE job_inputs (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    pos     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (job_id, pos)
);

CREATE TABLE chunks (
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    pos          INTEGER NOT NULL,
    len          INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done')),
    owner        TEXT,                         -- the node running it
    lease_until  INTEGER,                      -- the owner's heartbeat extends it
    runs         INTEGER NOT NULL DEFAULT 0,   -- how many times it was claimed
    worker       TEXT,
    node         TEXT,
    start_ms     DOUBLE PRECISION,
    duration_ms  DOUBLE PRECISION,
    spawn_ms     DOUBLE PRECISION,
    compute_ms   DOUBLE PRECISION,
    store_ms     DOUBLE PRECISION,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX chunks_owner ON chunks (owner) WHERE state = 'running';
CREATE INDEX chunks_lease ON chunks (lease_until) WHERE state = 'running';
CREATE INDEX chunks_claim ON chunks (job_id, idx) WHERE state = 'pending';

-- Squares, in segments of at most 65,536, in input order by pos.
CREATE TABLE results (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    pos     INTEGER NOT NULL,
    len     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (job_id, pos)
);

-- Idempotency keys: the same key with the same body returns the same job.
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    body_hash   TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Webhook deliveries, created in the transaction that ends a job with a
-- callback_url; any node delivers them, claiming one by moving next_at ahead.
CREATE TABLE webhooks (
    job_id    TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    url       TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts  INTEGER NOT NULL DEFAULT 0,
    next_at   INTEGER NOT NULL,
    history   TEXT NOT NULL DEFAULT '[]'             -- every attempt (JSON array)
);
CREATE INDEX webhooks_due ON webhooks (next_at) WHERE state = 'pending';

-- Comparisons: a matrix of strategies x cores x repeats run as ordinary jobs
-- of one series; cells (JSON) name each cell's jobs.
CREATE TABLE comparisons (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    request     TEXT NOT NULL,
    cells       TEXT NOT NULL
);

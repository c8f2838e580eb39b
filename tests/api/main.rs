//! Integration tests: a real `squared serve` on a real port, a real SQLite
//! file, real worker subprocesses.

mod hardening;
mod helpers;
mod jobs;
mod lifecycle;
mod results;
mod validation;

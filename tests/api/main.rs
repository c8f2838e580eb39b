//! Integration tests: a real `squared serve` on a real port, a real SQLite
//! file or a real PostgreSQL database, real worker subprocesses.
//!
//! Every test runs against both backends: `backend_tests!` makes a `sqlite`
//! and a `postgres` test of each. PostgreSQL tests need a server (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, or `SQUARED_TEST_POSTGRES_URL`);
//! without one they fail, never skip.

mod cli;
mod comparisons;
mod hardening;
#[allow(dead_code)]
mod helpers;
mod jobs;
mod lifecycle;
mod results;
mod validation;
mod webhooks;

/// Runs each named `async fn(Backend)` as a test on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}

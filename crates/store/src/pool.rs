//! Connecting to a service's own schema and migrating it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::StoreError;

static INFRASTRUCTURE: Migrator = sqlx::migrate!("./migrations");

/// Where a service keeps its data.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `postgres://…` URL of the database.
    pub database_url: String,
    /// The service's own schema, e.g. `gateway`.
    pub schema: String,
    pub max_connections: u32,
}

/// Connects to the service's schema, creating it if needed. Every connection of the pool has its
/// `search_path` set to that schema, so a service cannot read another's tables by accident.
pub async fn connect(config: &StoreConfig) -> Result<PgPool, StoreError> {
    let schema = &config.schema;
    if schema.is_empty()
        || !schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StoreError::InvalidSchema(schema.clone()));
    }
    let options = PgConnectOptions::from_str(&config.database_url)?;
    let mut connection = first_connection(&options).await?;
    // Several services may start at once against one database; the race on CREATE SCHEMA is
    // harmless but can raise a unique violation, which we treat as success.
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if let Err(error) = sqlx::query(&create).execute(&mut connection).await {
        if !crate::is_unique_violation(&error) {
            return Err(error.into());
        }
    }
    connection.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await?;
    Ok(pool)
}

/// How long a starting service waits for Postgres to answer (it may be starting too, or
/// restarting) before it gives up and exits.
const STARTUP_PATIENCE: Duration = Duration::from_secs(120);

/// The first connection, waited for with exponential backoff (0.2 s doubling to 5 s) while
/// Postgres is unreachable, for at most [`STARTUP_PATIENCE`]. A wrong URL, password or database
/// name fails at once: waiting would not fix it.
async fn first_connection(options: &PgConnectOptions) -> Result<sqlx::PgConnection, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match sqlx::PgConnection::connect_with(options).await {
            Ok(connection) => {
                if started.elapsed() > Duration::from_secs(1) {
                    tracing::info!(
                        waited_ms = started.elapsed().as_millis() as u64,
                        "Postgres answers"
                    );
                }
                return Ok(connection);
            }
            Err(error) if crate::is_unreachable(&error) && started.elapsed() < STARTUP_PATIENCE => {
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "Postgres is not reachable yet; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Applies the shared infrastructure migrations (versions below 1000), then the service's own
/// (versions 1000 and up). Both share the schema's `_sqlx_migrations` table.
pub async fn migrate(pool: &PgPool, service: &Migrator) -> Result<(), StoreError> {
    for migrator in [&INFRASTRUCTURE, service] {
        let tolerant = Migrator {
            migrations: migrator.migrations.clone(),
            ignore_missing: true,
            ..Migrator::DEFAULT
        };
        tolerant.run(pool).await?;
    }
    Ok(())
}

/// Creates database `name` on the server `server_url` points at, unless it exists.
pub async fn create_database(server_url: &str, name: &str) -> Result<bool, StoreError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StoreError::InvalidSchema(name.to_owned()));
    }
    let mut connection = sqlx::PgConnection::connect(server_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut connection)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await?;
    }
    connection.close().await?;
    Ok(!exists)
}

/// `url` with its database name replaced by `database`.
pub fn url_with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::url_with_database as with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
    }
}

//! Generated code for the `tandem.v1` protobuf package: the public gRPC APIs (operator, merchant
//! gateway), the internal ledger API and the event envelope carried on Kafka topics. No logic
//! lives here; conversions to domain types live in the services that own them.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// Encoded `FileDescriptorSet` of every `tandem.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_v1_descriptor");

/// Conversions between protobuf timestamps and `chrono` instants. Tandem keeps instants at
/// microsecond precision everywhere (Postgres' precision), so an instant read back from the
/// database equals the one that was written and a replay reproduces it exactly.
pub mod time {
    use chrono::{DateTime, DurationRound, TimeDelta, Utc};

    /// The instant truncated to whole microseconds.
    pub fn truncate_to_micros(instant: DateTime<Utc>) -> DateTime<Utc> {
        instant
            .duration_trunc(TimeDelta::microseconds(1))
            .unwrap_or(instant)
    }

    pub fn timestamp(instant: DateTime<Utc>) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: instant.timestamp(),
            nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(0),
        }
    }

    /// `None` if the timestamp is out of range.
    pub fn datetime(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
        let nanos = u32::try_from(timestamp.nanos).ok()?;
        DateTime::from_timestamp(timestamp.seconds, nanos).map(truncate_to_micros)
    }
}

//! How a service reaches Kafka: bootstrap servers, the topic prefix of its deployment, and the
//! client properties an operator passes through for their cluster (TLS, SASL, timeouts).

use std::fmt;

use rdkafka::config::ClientConfig;

/// How a service reaches the broker and which topics are its deployment's.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    /// Prefix of every topic name, e.g. `tandem` gives `tandem.customer-activity`. Tests use a
    /// unique prefix each so they never see each other's messages.
    pub topic_prefix: String,
    /// librdkafka properties applied to every client (producer, consumers, admin), e.g.
    /// `security.protocol=SASL_SSL`.
    pub client_properties: ClientProperties,
}

impl BusConfig {
    /// A client configuration with the bootstrap servers and the operator's properties; callers
    /// add what their kind of client needs.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client_properties.0 {
            config.set(key, value);
        }
        config
    }
}

/// Properties that Tandem sets itself because its guarantees depend on them; an operator's file
/// may not change them.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
];

/// Client properties from a Java-style properties file (`key=value` per line, `#` comments).
/// Values may be secrets (`sasl.password`), so `Debug` shows only the keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientProperties(Vec<(String, String)>);

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(key, _)| format!("{key}=<redacted>")))
            .finish()
    }
}

impl ClientProperties {
    /// Parses the text of a properties file; the error names the line and what to fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut properties = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {}: expected key=value", index + 1));
            };
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(format!("line {}: the key is empty", index + 1));
            }
            if RESERVED.contains(&key) {
                return Err(format!(
                    "line {}: {key} is set by Tandem itself and cannot be overridden (see docs/ARCHITECTURE.md, \"Kafka\")",
                    index + 1
                ));
            }
            properties.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self(properties))
    }

    /// Reads and parses a properties file.
    pub fn from_file(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {path}: {error}"))?;
        Self::parse(&text).map_err(|reason| format!("{path}: {reason}"))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(key, _)| key.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comments_blank_lines_and_values_with_equals_signs() {
        let properties = ClientProperties::parse(
            "# TLS\nsecurity.protocol = SASL_SSL\n\n! old style comment\nsasl.jaas.config=a=b\n",
        )
        .unwrap_or_default();
        assert_eq!(
            properties.0,
            vec![
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("sasl.jaas.config".to_owned(), "a=b".to_owned()),
            ]
        );
    }

    #[test]
    fn refuses_what_tandem_sets_itself_and_names_the_line() {
        let error = ClientProperties::parse("security.protocol=SSL\nenable.auto.commit=true\n")
            .err()
            .unwrap_or_default();
        assert!(
            error.starts_with("line 2: enable.auto.commit is set by Tandem"),
            "{error}"
        );
        let error = ClientProperties::parse("no-equals-sign")
            .err()
            .unwrap_or_default();
        assert_eq!(error, "line 1: expected key=value");
    }

    #[test]
    fn debug_never_shows_values() {
        let properties = ClientProperties::parse("sasl.password=hunter2").unwrap_or_default();
        let shown = format!("{properties:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
    }
}

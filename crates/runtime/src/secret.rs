//! A configuration secret (a token, a key) that never shows in `Debug` output or logs.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must compare or use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

/// A clap value parser for a secret setting: `parse` checks the value, and a value it refuses
/// is reported with the setting's name and the reason, never the value itself (clap's own
/// parsers print the value they refused: a mistyped key would land in the service's log).
pub fn secret_parser<T, F>(parse: F) -> SecretParser<F>
where
    F: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    SecretParser(parse)
}

#[derive(Clone)]
pub struct SecretParser<F>(F);

impl<T, F> clap::builder::TypedValueParser for SecretParser<F>
where
    F: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        argument: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let setting = argument.map_or_else(
            || "a secret setting".to_owned(),
            |argument| match argument.get_env() {
                Some(env) => format!("{} ({})", env.to_string_lossy(), argument),
                None => argument.to_string(),
            },
        );
        let refused = |reason: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for {setting}: {reason} (the value is not shown: it is a secret)\n"),
            )
        };
        let value = value
            .to_str()
            .ok_or_else(|| refused("it is not valid UTF-8"))?;
        (self.0)(value).map_err(|reason| refused(&reason))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Settings {
        #[arg(long, env = "TANDEM_TEST_SECRET_PARSER", value_parser = super::secret_parser(|value: &str| {
            if value.len() >= 16 { Ok(super::Secret::new(value)) } else { Err("must be at least 16 characters".to_owned()) }
        }))]
        token: super::Secret,
    }

    #[test]
    fn a_refused_secret_is_named_but_never_shown() {
        let error = Settings::try_parse_from(["test", "--token", "hunter2-short"])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("TANDEM_TEST_SECRET_PARSER"), "{error}");
        assert!(error.contains("--token"), "{error}");
        assert!(error.contains("at least 16 characters"), "{error}");
        let parsed = Settings::try_parse_from(["test", "--token", "a-long-enough-token"]).unwrap();
        assert_eq!(parsed.token.expose(), "a-long-enough-token");
    }
}

//! Configuration, read in three steps:
//! 1. [`schema`]: the TOML file's serde structs, one per table; unknown keys are errors,
//!    defaults are filled in.
//! 2. `validate`: everything that can be checked without the network (files, ranges,
//!    cross-references), every problem at once.
//! 3. [`model`], built from the schema by `build`: the typed configuration the rest of
//!    leasegate reads, split into what needs a restart ([`StaticConfig`]) and what a reload
//!    applies ([`ReloadableConfig`]). A key a method or mode needs and lacks is a problem of
//!    this step, reported with the others.

mod build;
pub mod model;
pub(crate) mod schema;
pub(crate) mod socket_dir;
mod validate;

use std::path::{Path, PathBuf};

pub use model::{
    AdminConfig, AuditConfig, AuthMethod, CLUSTER_CA_REQUIRED, CancelLimits, ClusterConfig, Config,
    DatabaseConfig, GrantConfig, ListenConfig, MetricsConfig, Problems, ReloadableConfig, RoleId,
    RuntimeConfig, SessionLimits, StaticConfig, StaticListen, UpstreamTls, VaultAuth, VaultConfig,
};

/// Problems found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// Why (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// The TOML error, with line and column.
        message: String,
    },
    /// Semantic problems, all of them.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A configuration file looked at in full, for `check-config`.
pub struct Examined {
    /// The typed configuration, when the keys every method and mode needs are there (it may
    /// still have `problems`).
    pub config: Option<Config>,
    /// Every problem found.
    pub problems: Vec<String>,
    /// What deserves attention without refusing the file.
    pub warnings: Vec<String>,
}

impl Examined {
    /// Validates `file` (read from `source`) and builds the typed configuration.
    fn of(file: schema::File, source: Option<&Path>) -> Examined {
        let mut problems = validate::problems(&file, source);
        let warnings = validate::warnings(&file, source);
        let config = Config::try_from(file)
            .map_err(|p| problems.extend(p.0))
            .ok();
        Examined {
            config,
            problems,
            warnings,
        }
    }
}

impl Config {
    /// Reads, parses and validates the file; relative paths are resolved against the file's
    /// directory. Warnings are logged.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let examined = Config::examine(path)?;
        match examined.config {
            Some(config) if examined.problems.is_empty() => {
                for warning in examined.warnings {
                    tracing::warn!("{warning}");
                }
                Ok(config)
            }
            _ => Err(ConfigError::Invalid(examined.problems)),
        }
    }

    /// Reads and parses the file, resolves relative paths, and collects every problem and
    /// warning, so that `check-config` can add its own checks to them.
    pub fn examine(path: &Path) -> Result<Examined, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut file = parse_file(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        if let Some(base) = path.parent() {
            file.resolve_paths(base);
        }
        Ok(Examined::of(file, Some(path)))
    }

    /// Parses TOML text into the typed configuration, without validating (no file is read).
    pub fn parse(text: &str) -> Result<Config, String> {
        Config::try_from(parse_file(text)?).map_err(|p| p.to_string())
    }
}

fn parse_file(text: &str) -> Result<schema::File, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;

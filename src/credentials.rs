//! Credentials read from files: secrets (passwords, tokens) that are never printed, and PEM
//! certificates, for etcd's connections and the API's alike.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A password or token: redacted when printed, readable only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The first line of the file at `path`: a trailing newline is not part of the secret.
    pub fn from_file(path: &Path) -> Result<Secret> {
        let text = read(path, "secret file")?;
        match text.lines().next() {
            Some(line) if !line.is_empty() => Ok(Secret(line.to_owned())),
            _ => Err(Error::Credentials(format!(
                "the secret file {} is empty",
                path.display()
            ))),
        }
    }

    /// The secret in `file` if one is named, else the value of the environment variable `env`
    /// if it is set and not empty, else none.
    pub fn from_file_or_env(file: Option<&Path>, env: &str) -> Result<Option<Secret>> {
        match file {
            Some(file) => Secret::from_file(file).map(Some),
            None => Ok(std::env::var(env)
                .ok()
                .filter(|value| !value.is_empty())
                .map(Secret)),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// A client certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The text of `path`; an error naming it (as `what`) if it cannot be read.
pub(crate) fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Credentials(format!("cannot read the {what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_redacted_when_printed() {
        let printed = format!("{:?}", Secret::new("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn a_secret_file_gives_its_first_line_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "s3cret");
    }

    #[test]
    fn an_empty_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "\n").unwrap();
        let error = Secret::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("is empty"), "{error}");
    }
}

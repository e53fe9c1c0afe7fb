//! Validated cluster and node names, and the etcd key layout built from them.
//!
//! Every fencelog key lives under `/fencelog/<cluster>/`. Names are 1–64 characters of
//! `[A-Za-z0-9_.-]`, so no input can reach outside its cluster's prefix.
//!
//! | key                               | value                                             |
//! |-----------------------------------|---------------------------------------------------|
//! | `leader`                          | the primary's name and address, under its lease   |
//! | `latest`                          | the commit pointer ([`crate::pointer`])           |
//! | `batches/<first_seq, 20 digits>`  | one encoded batch ([`crate::batch`])              |
//! | `members/<node>`                  | a standby's registration, under its lease         |

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::record::Seq;

const MAX_NAME_LEN: usize = 64;
/// `u64::MAX` has 20 decimal digits: zero-padding to 20 makes etcd's byte order numeric order.
const SEQ_DIGITS: usize = 20;

fn validate_name(what: &'static str, value: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return invalid("must be 1 to 64 characters long");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return invalid("may only contain A-Z, a-z, 0-9, '_', '.' and '-'");
    }
    if value.bytes().all(|b| b == b'.') {
        return invalid("must not consist of dots only");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self> {
                validate_name($what, value)?;
                Ok($name(value.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of one fencelog cluster: the etcd prefix it owns.
    ClusterId,
    "cluster id"
);
name_type!(
    /// The name of one node (primary or standby) within a cluster.
    NodeName,
    "node name"
);

/// The etcd keys of one cluster. The only place that builds or parses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    root: String,
}

impl KeyLayout {
    pub fn new(cluster: &ClusterId) -> KeyLayout {
        KeyLayout {
            root: format!("/fencelog/{cluster}/"),
        }
    }

    /// The prefix of every key of this cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    pub fn latest(&self) -> String {
        format!("{}latest", self.root)
    }

    /// The log's identity: a random id written once, when the cluster's first node starts.
    pub fn log_id(&self) -> String {
        format!("{}log_id", self.root)
    }

    /// A running node's claim on its name, under a lease of its own for the daemon's life.
    pub fn node_claim(&self, node: &NodeName) -> String {
        format!("{}nodes/{node}", self.root)
    }

    pub fn node_claims_prefix(&self) -> String {
        format!("{}nodes/", self.root)
    }

    /// The lowest seq still in etcd, moved by each trim.
    pub fn trimmed(&self) -> String {
        format!("{}trimmed", self.root)
    }

    pub fn batches_prefix(&self) -> String {
        format!("{}batches/", self.root)
    }

    pub fn batch(&self, first_seq: Seq) -> String {
        format!(
            "{}batches/{:0width$}",
            self.root,
            first_seq.0,
            width = SEQ_DIGITS
        )
    }

    /// The first seq named by a batch key of this cluster.
    pub fn parse_batch_key(&self, key: &[u8]) -> Result<Seq> {
        let not_a_batch_key = || Error::NotABatchKey {
            key: String::from_utf8_lossy(key).into_owned(),
        };
        let digits = key
            .strip_prefix(self.batches_prefix().as_bytes())
            .filter(|d| d.len() == SEQ_DIGITS && d.iter().all(u8::is_ascii_digit))
            .ok_or_else(not_a_batch_key)?;
        let digits = std::str::from_utf8(digits).map_err(|_| not_a_batch_key())?;
        digits
            .parse::<u64>()
            .map(Seq)
            .map_err(|_| not_a_batch_key())
    }

    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.root)
    }

    pub fn member(&self, node: &NodeName) -> String {
        format!("{}members/{node}", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KeyLayout {
        KeyLayout::new(&"prod-1".parse().unwrap())
    }

    #[test]
    fn names_that_could_escape_the_prefix_are_refused() {
        for bad in ["", "a/b", "..", ".", "a b", "é", &"x".repeat(65), "a\0"] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?} accepted");
            assert!(bad.parse::<NodeName>().is_err(), "{bad:?} accepted");
        }
        for good in ["a", "prod-1", "Node_2.eu", &"x".repeat(64)] {
            assert!(good.parse::<ClusterId>().is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn batch_keys_sort_numerically_and_parse_back() {
        let l = layout();
        assert_eq!(
            l.batch(Seq(42)),
            "/fencelog/prod-1/batches/00000000000000000042"
        );
        assert!(l.batch(Seq(9)) < l.batch(Seq(10)));
        assert!(l.batch(Seq(u64::MAX - 1)) < l.batch(Seq(u64::MAX)));
        assert_eq!(
            l.parse_batch_key(l.batch(Seq(u64::MAX)).as_bytes())
                .unwrap(),
            Seq(u64::MAX)
        );
    }

    #[test]
    fn foreign_or_malformed_batch_keys_are_refused() {
        let l = layout();
        let other = KeyLayout::new(&"prod-2".parse().unwrap());
        assert!(l.parse_batch_key(other.batch(Seq(1)).as_bytes()).is_err());
        assert!(l.parse_batch_key(b"/fencelog/prod-1/batches/42").is_err());
        assert!(l
            .parse_batch_key(b"/fencelog/prod-1/batches/9999999999999999999x")
            .is_err());
        assert!(l
            .parse_batch_key(b"/fencelog/prod-1/batches/99999999999999999999")
            .is_err());
    }
}

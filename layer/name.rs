//! Event names, their batching prefix, and glob patterns over segments.
//!
//! Names are colon-separated (`data:users:created`). The batching key of a
//! name, its *prefix*, is its first `depth` segments (two by default), so
//! `data:users:created` batches under `data:users`; a name with fewer segments
//! is its own prefix.
//!
//! Patterns are globs over whole segments: `*` matches exactly one segment, and
//! a trailing `*` matches one or more remaining segments.
//!
//! ```
//! use spillway::{prefix_of, Pattern};
//! assert_eq!(prefix_of("data:users:created", 2), "data:users");
//! assert_eq!(prefix_of("serving.snapshot", 2), "serving.snapshot");
//! let p = Pattern::parse("sentinel:*:status").unwrap();
//! assert!(p.matches("sentinel:42:status"));
//! assert!(Pattern::parse("data:*").unwrap().matches("data:a:b:c"));
//! ```

use crate::error::{Error, Result};

/// The default number of segments in a batching prefix.
pub const DEFAULT_PREFIX_DEPTH: usize = 2;

/// The batching key of `name`: its first `depth` colon-separated segments.
///
/// Never allocates. A `depth` of 0 is treated as 1.
pub fn prefix_of(name: &str, depth: usize) -> &str {
    let depth = depth.max(1);
    let mut seen = 0;
    for (i, b) in name.bytes().enumerate() {
        if b == b':' {
            seen += 1;
            if seen == depth {
                return &name[..i];
            }
        }
    }
    name
}

/// Checks that `name` can be published: non-empty, no empty segment, no `*`.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("the name is empty")
    } else if name.split(':').any(str::is_empty) {
        Some("it has an empty segment")
    } else if name.contains('*') {
        Some("`*` is only allowed in patterns")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    Any,
}

/// A glob over colon-separated segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    segs: Box<[Seg]>,
    /// The last `*` also matches every segment after it.
    open_tail: bool,
}

impl Pattern {
    /// Parses a pattern; the error quotes it and says what is wrong.
    pub fn parse(text: &str) -> Result<Pattern> {
        let bad = |reason| Error::InvalidPattern {
            pattern: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("the pattern is empty"));
        }
        let mut segs = Vec::new();
        for seg in text.split(':') {
            segs.push(match seg {
                "" => return Err(bad("it has an empty segment")),
                "*" => Seg::Any,
                s if s.contains('*') => {
                    return Err(bad("`*` must be a whole segment (no `**` or `a*`)"))
                }
                s => Seg::Lit(s.into()),
            });
        }
        let open_tail = segs.len() > 1 && segs.last() == Some(&Seg::Any);
        Ok(Pattern {
            text: text.into(),
            segs: segs.into(),
            open_tail,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches. Allocation-free.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = name.split(':');
        let last = self.segs.len() - 1;
        for (i, seg) in self.segs.iter().enumerate() {
            let Some(part) = parts.next() else {
                return false;
            };
            if let Seg::Lit(lit) = seg {
                if **lit != *part {
                    return false;
                }
            }
            if i == last && self.open_tail {
                return true;
            }
        }
        parts.next().is_none()
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Pattern> {
        Pattern::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches an off-by-one in the segment counting that would batch
    // `data:users:created` and `data:users:deleted` apart (or all of `data` together).
    #[test]
    fn prefix_table() {
        let cases = [
            ("data:users:created", 2, "data:users"),
            ("data:users", 2, "data:users"),
            ("data:code_index:created", 2, "data:code_index"),
            ("serving.snapshot", 2, "serving.snapshot"),
            ("sentinel:7:status", 1, "sentinel"),
            ("a:b:c:d", 3, "a:b:c"),
            ("a:b", 0, "a"),
        ];
        for (name, depth, want) in cases {
            assert_eq!(prefix_of(name, depth), want, "prefix_of({name:?}, {depth})");
        }
    }

    // Catches a glob that lets `*` span segments, or a trailing `*` that fails to.
    #[test]
    fn pattern_table() {
        let cases = [
            ("data:*", "data:a:b:c", true),
            ("data:*", "data:users", true),
            ("data:*", "data", false),
            ("data:*", "database:users", false),
            ("sentinel:*:status", "sentinel:42:status", true),
            ("sentinel:*:status", "sentinel:42:log", false),
            ("sentinel:*:status", "sentinel:42:status:x", false),
            ("chat:message", "chat:message", true),
            ("chat:message", "chat:message:x", false),
            ("*", "anything", true),
            ("*", "a:b", false),
            ("*:batch", "data:batch", true),
            ("gpu:*", "gpu:batch", true),
        ];
        for (pat, name, want) in cases {
            let p = Pattern::parse(pat).unwrap();
            assert_eq!(p.matches(name), want, "{pat:?} vs {name:?}");
        }
    }

    // Catches invalid patterns being accepted, and errors that do not quote the input.
    #[test]
    fn invalid_patterns_are_rejected_with_the_pattern_quoted() {
        for bad in ["", "data::x", ":a", "a:", "**", "data:**", "da*ta", "a:b*"] {
            let err = Pattern::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    // Catches names that would create empty or wildcard batch keys.
    #[test]
    fn invalid_names_are_rejected_with_the_name_quoted() {
        for bad in ["", "data::users", ":x", "x:", "data:*"] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        validate_name("data:users:created").unwrap();
        validate_name("serving.snapshot").unwrap();
    }
}

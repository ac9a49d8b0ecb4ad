//! The identity of a workload meshcanary runs: a namespace and the canary Deployment's name
//! (`NAME`; the primary is `NAME-primary`).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub namespace: String,
    pub name: String,
}

impl WorkloadId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        WorkloadId {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// Flagger's way of naming a workload in messages: `name.namespace`.
impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

//! What each job costs and who asks for it, for the operator's page: one
//! small record per key, shared by the key's stored answers, with counters
//! the request path bumps. The page learns which jobs are busy without
//! scanning the store: the first time a key is asked for in a sampling
//! period, its record is put on a short list the page drains once a second.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::CacheKey;
use crate::route::Api;

/// One job's counters.
#[derive(Debug)]
pub struct JobActivity {
    pub key: CacheKey,
    pub api: Api,
    pub project: Box<str>,
    /// The job ID (`instance/job` for ROMA).
    pub job: Box<str>,
    /// Set by every hit on a running answer, so the refresh ahead of the
    /// window's end knows the job is still being polled.
    pub polled: AtomicBool,
    /// Client requests answered for this job.
    pub requests: AtomicU64,
    /// Upstream requests made for it.
    pub upstream: AtomicU64,
    /// Clients watching it now.
    pub watchers: AtomicU32,
    /// The sampling period in which it was last listed.
    period: AtomicU32,
}

impl JobActivity {
    pub fn new(key: CacheKey, api: Api, project: &str, job: &str) -> Self {
        JobActivity {
            key,
            api,
            project: project.into(),
            job: job.into(),
            polled: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            upstream: AtomicU64::new(0),
            watchers: AtomicU32::new(0),
            period: AtomicU32::new(u32::MAX),
        }
    }
}

/// At most this many jobs are listed per period: the page shows the busiest
/// few, and nothing grows without a page draining the list.
const MAX_LISTED: usize = 10_000;

/// The jobs asked for in the current sampling period.
#[derive(Debug, Default)]
pub struct Activities {
    period: AtomicU32,
    listed: Mutex<Vec<Arc<JobActivity>>>,
}

impl Activities {
    /// Notes that `job` was asked for (a request, a fetch, a watcher).
    /// Costs one atomic load unless it is the job's first time this period.
    pub fn touch(&self, job: &Arc<JobActivity>) {
        let period = self.period.load(Ordering::Relaxed);
        if job.period.load(Ordering::Relaxed) == period
            || job.period.swap(period, Ordering::Relaxed) == period
        {
            return;
        }
        let mut listed = self.listed.lock();
        if listed.len() < MAX_LISTED {
            listed.push(job.clone());
        }
    }

    /// The jobs asked for since the last call; starts a new period.
    pub fn drain(&self) -> Vec<Arc<JobActivity>> {
        let listed = std::mem::take(&mut *self.listed.lock());
        self.period.fetch_add(1, Ordering::Relaxed);
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::key;

    #[test]
    fn a_job_is_listed_once_per_period() {
        let activities = Activities::default();
        let a = Arc::new(JobActivity::new(key("a"), Api::Roma, "p", "i/a"));
        let b = Arc::new(JobActivity::new(key("b"), Api::Drs, "p", "b"));
        for _ in 0..3 {
            activities.touch(&a);
        }
        activities.touch(&b);
        let listed: Vec<_> = activities.drain().iter().map(|j| j.job.clone()).collect();
        assert_eq!(listed, ["i/a".into(), "b".into()] as [Box<str>; 2]);
        assert!(activities.drain().is_empty(), "nothing asked since");
        activities.touch(&b);
        assert_eq!(activities.drain().len(), 1, "listed again in a new period");
    }
}

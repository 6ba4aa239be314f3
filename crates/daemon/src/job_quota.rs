//! Caps on running jobs, in all and per client: a request that would start a job
//! reserves a place first, the place is tied to the job it started, and is given
//! back when that job finishes (or at once when the request started none).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

/// Who submitted a job. Every unix socket client together is one local client; a
/// TCP client is its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Local,
    Remote(IpAddr),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Local => write!(f, "the local (unix socket) client"),
            Client::Remote(ip) => write!(f, "client {ip}"),
        }
    }
}

/// Why no place was free.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaFull {
    #[error("{running} jobs are running, the most the service runs at once; retry when some have finished")]
    Total { running: u32 },
    #[error("{client} has {running} jobs running, the most one client may have; retry when some have finished")]
    PerClient { client: Client, running: u32 },
}

#[derive(Default)]
struct State {
    total: u32,
    by_client: HashMap<Client, u32>,
    /// Jobs holding a place, and whose place it is.
    owners: HashMap<Uuid, Client>,
}

pub struct JobQuota {
    max_total: u32,
    max_per_client: u32,
    state: Mutex<State>,
}

/// A place taken for a job about to start; given back on drop unless bound to a job.
pub struct Reservation {
    quota: Arc<JobQuota>,
    client: Client,
    bound: bool,
}

impl JobQuota {
    pub fn new(max_total: u32, max_per_client: u32) -> Arc<Self> {
        Arc::new(JobQuota {
            max_total,
            max_per_client,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for one job of `client`.
    pub fn reserve(self: &Arc<Self>, client: Client) -> Result<Reservation, QuotaFull> {
        let mut state = self.lock();
        if state.total >= self.max_total {
            return Err(QuotaFull::Total {
                running: state.total,
            });
        }
        let mine = state.by_client.entry(client).or_insert(0);
        if *mine >= self.max_per_client {
            return Err(QuotaFull::PerClient {
                client,
                running: *mine,
            });
        }
        *mine += 1;
        state.total += 1;
        Ok(Reservation {
            quota: self.clone(),
            client,
            bound: false,
        })
    }

    /// Gives back the place of job `id` if it holds one. Called for every finished job
    /// (also those that started without a reservation); a second call does nothing.
    pub fn finished(&self, id: Uuid) {
        let mut state = self.lock();
        if let Some(client) = state.owners.remove(&id) {
            release(&mut state, client);
        }
    }

    /// Running jobs that hold a place, in all.
    pub fn running(&self) -> u32 {
        self.lock().total
    }
}

fn release(state: &mut State, client: Client) {
    state.total = state.total.saturating_sub(1);
    if let Some(n) = state.by_client.get_mut(&client) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            state.by_client.remove(&client);
        }
    }
}

impl Reservation {
    /// Ties the place to job `id`: it is given back when `JobQuota::finished(id)` is
    /// called. The caller must check afterwards whether the job had already finished
    /// (its `finished` call may have come first) and call `finished` itself if so.
    pub fn bind(mut self, id: Uuid) {
        self.bound = true;
        self.quota.lock().owners.insert(id, self.client);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.bound {
            release(&mut self.quota.lock(), self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_share_until_the_total_is_reached() {
        let q = JobQuota::new(3, 2);
        let a = Client::Local;
        let b = Client::Remote("10.0.0.9".parse().unwrap());
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        q.reserve(a).unwrap().bind(ids[0]);
        q.reserve(a).unwrap().bind(ids[1]);
        assert!(matches!(q.reserve(a), Err(QuotaFull::PerClient { .. })));
        q.reserve(b).unwrap().bind(ids[2]);
        assert_eq!(q.reserve(b).err(), Some(QuotaFull::Total { running: 3 }));
        q.finished(ids[0]);
        q.finished(ids[0]);
        assert_eq!(q.running(), 2);
        assert!(q.reserve(a).is_ok());
    }

    #[test]
    fn a_request_that_started_no_job_gives_its_place_back() {
        let q = JobQuota::new(1, 1);
        drop(q.reserve(Client::Local).unwrap());
        assert_eq!(q.running(), 0);
        assert!(q.reserve(Client::Local).is_ok());
    }
}

//! The service's shared state, handed to every request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::events::EventBody;
use api::host::HostInfo;
use api::vms::{Vm, VmRuntime, VmState, VmSummary};
use api::ErrorCode;
use jobs::{EventSink, JobEngine, JobEngineConfig};
use uuid::Uuid;
use vm_config::{validate, HostLimits, VmSettings};

use crate::admission::{Capacity, Demand};
use crate::config::DaemonConfig;
use crate::convert;
use crate::error::ApiError;
use crate::events::EventBus;
use crate::vms::runtime::{RuntimeTable, WorkerControl};
use crate::vms::store::{error_chain, Store, VmEntry};

pub struct Service {
    pub config: DaemonConfig,
    pub limits: HostLimits,
    pub host: HostInfo,
    pub capacity: Capacity,
    /// Processor defaults for new VMs (`<data-dir>/host.json`).
    pub new_vm_defaults: Mutex<api::host::NewVmDefaults>,
    /// Where the API may use files.
    pub roots: crate::storage_roots::StorageRoots,
    pub store: Mutex<Store>,
    pub jobs: JobEngine,
    pub events: Arc<EventBus>,
    pub runtime: RuntimeTable,
    /// The worker integration; `None` until VM lifecycle is wired in.
    pub workers: Option<Arc<dyn WorkerControl>>,
    /// The bearer token TCP requests must carry.
    pub token: Option<String>,
    /// Checkpoint work in flight per VM.
    pub checkpoints: Arc<crate::checkpoints::Checkpoints>,
    /// Places of running jobs, in all and per client.
    pub job_quota: Arc<crate::job_quota::JobQuota>,
    /// `GET /v1/events` listeners connected now.
    pub event_listeners: Arc<std::sync::atomic::AtomicU32>,
    /// Virtual switches: their files, bridges and running VMs' ports.
    pub switches: Arc<crate::switches::Switches>,
    /// Dynamic MAC addresses for adapters added without one.
    pub mac_pool: crate::mac_pool::MacPool,
}

impl Service {
    /// Opens the store and starts the job engine (must run inside tokio).
    pub fn new(
        config: DaemonConfig,
        token: Option<String>,
        settings: crate::host_settings::HostSettings,
        roots: crate::storage_roots::StorageRoots,
    ) -> Result<Service, crate::vms::store::StoreError> {
        let limits = crate::host::limits();
        let mut host = crate::host::info(&config, &limits);
        host.storage_roots = roots.paths();
        let capacity = crate::host::capacity(&config, &limits);
        let store = Store::open(&config.data_dir)?;
        let config_data_dir = config.data_dir.clone();
        let new_vm_defaults = settings.new_vm_defaults;
        let mac_range = settings
            .mac_address_pool
            .as_ref()
            .and_then(|p| match crate::mac_pool::MacRange::new(&p.minimum, &p.maximum) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "host.json's MAC address pool is not usable; the host's default pool is used");
                    None
                }
            })
            .unwrap_or_else(crate::mac_pool::MacRange::host_default);
        let mac_pool = crate::mac_pool::MacPool::open(&config.data_dir, mac_range);
        let events = Arc::new(EventBus::default());
        let sink_events = events.clone();
        let job_quota = crate::job_quota::JobQuota::new(
            config.max_running_jobs,
            config.max_running_jobs_per_client,
        );
        let sink_quota = job_quota.clone();
        let sink: EventSink = Arc::new(move |s| {
            if s.state.is_finished() {
                sink_quota.finished(s.id);
            }
            sink_events.publish(EventBody::Job {
                job: convert::job(s),
            })
        });
        let jobs = JobEngine::new(
            JobEngineConfig {
                retention: Duration::from_secs(config.job_retention),
                limit: config.job_limit,
                ..Default::default()
            },
            Some(sink),
        );
        Ok(Service {
            config,
            limits,
            host,
            capacity,
            new_vm_defaults: Mutex::new(new_vm_defaults),
            roots,
            store: Mutex::new(store),
            jobs,
            events,
            runtime: RuntimeTable::default(),
            workers: None,
            token,
            checkpoints: Arc::default(),
            job_quota,
            event_listeners: Arc::default(),
            switches: Arc::new(crate::switches::Switches::open(&config_data_dir)),
            mac_pool,
        })
    }

    /// `GET /v1/host`: the fixed facts and what running VMs hold now.
    pub fn host_info(&self) -> HostInfo {
        let store = self.store();
        let mut host = self.host.clone();
        host.resources = self.capacity.report(self.running_demand(&store, None));
        host.new_vm_defaults = self.defaults();
        host.network.vlan = self.switches.vlan_info();
        let range = self.mac_pool.range();
        host.mac_address_pool = api::host::MacAddressPool {
            minimum: range.minimum.to_string(),
            maximum: range.maximum.to_string(),
        };
        host
    }

    /// A MAC address for a new adapter from the host's pool: none that a VM or a
    /// checkpoint on this host holds.
    pub fn new_mac(&self) -> Result<String, ApiError> {
        self.mac_pool
            .allocate(|| self.held_macs())
            .map_err(|e| ApiError::new(ErrorCode::InsufficientResources, e))
    }

    /// Every MAC address the VMs and their checkpoints on this host hold.
    fn held_macs(&self) -> std::collections::HashSet<crate::mac_pool::Mac> {
        let store = self.store();
        let mut held = std::collections::HashSet::new();
        for e in store.entries() {
            let mut add = |s: &VmSettings| {
                held.extend(
                    s.network_adapters
                        .iter()
                        .filter_map(|a| crate::mac_pool::Mac::parse(&a.mac)),
                )
            };
            if let Some(s) = &e.settings {
                add(s);
            }
            let snapshots = e.dir.join(crate::checkpoints::tree::SNAPSHOTS_FOLDER);
            for node in std::fs::read_dir(snapshots).into_iter().flatten().flatten() {
                let file = node.path().join(crate::checkpoints::tree::SETTINGS_FILE);
                if let Ok(s) = vm_config::file::load(&file) {
                    add(&s);
                }
            }
        }
        held
    }

    pub fn defaults(&self) -> api::host::NewVmDefaults {
        *self
            .new_vm_defaults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `PATCH /v1/host`: checks and saves new processor defaults for new VMs.
    pub fn update_host(&self, req: &api::host::UpdateHostRequest) -> Result<HostInfo, ApiError> {
        {
            let mut d = self
                .new_vm_defaults
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut new = *d;
            new.reserve_percent = req.default_reserve_percent.unwrap_or(new.reserve_percent);
            new.limit_percent = req.default_limit_percent.unwrap_or(new.limit_percent);
            new.relative_weight = req.default_relative_weight.unwrap_or(new.relative_weight);
            use vm_config::validate::{MAX_PERCENT, MAX_RELATIVE_WEIGHT, MIN_RELATIVE_WEIGHT};
            if new.reserve_percent > MAX_PERCENT {
                return Err(vm_config::ConfigError::ProcessorReserve(new.reserve_percent).into());
            }
            if new.limit_percent > MAX_PERCENT {
                return Err(vm_config::ConfigError::ProcessorLimit(new.limit_percent).into());
            }
            if !(MIN_RELATIVE_WEIGHT..=MAX_RELATIVE_WEIGHT).contains(&new.relative_weight) {
                return Err(vm_config::ConfigError::ProcessorWeight(new.relative_weight).into());
            }
            let old_range = self.mac_pool.range();
            let range = match (&req.mac_address_minimum, &req.mac_address_maximum) {
                (None, None) => old_range,
                (min, max) => {
                    let min = min.clone().unwrap_or_else(|| old_range.minimum.to_string());
                    let max = max.clone().unwrap_or_else(|| old_range.maximum.to_string());
                    crate::mac_pool::MacRange::new(&min, &max)
                        .map_err(|e| ApiError::new(ErrorCode::InvalidParameter, e))?
                }
            };
            let pool = (range != crate::mac_pool::MacRange::host_default()).then(|| {
                api::host::MacAddressPool {
                    minimum: range.minimum.to_string(),
                    maximum: range.maximum.to_string(),
                }
            });
            crate::host_settings::save(&self.config.data_dir, new, pool)
                .map_err(ApiError::internal)?;
            self.mac_pool.set_range(range).map_err(ApiError::internal)?;
            *d = new;
        }
        Ok(self.host_info())
    }

    /// What the VMs that run (or are starting or stopping) hold, except VM `except`.
    pub fn running_demand(&self, store: &Store, except: Option<Uuid>) -> Demand {
        store
            .entries()
            .filter(|e| Some(e.id) != except)
            .filter(|e| {
                matches!(
                    self.runtime.get(e.id).state,
                    VmState::Starting
                        | VmState::Running
                        | VmState::Paused
                        | VmState::Saving
                        | VmState::Stopping
                )
            })
            .filter_map(|e| e.settings.as_ref().map(Demand::of))
            .fold(Demand::default(), |a, b| a + b)
    }

    /// Admission control for VM `settings` about to run (or to run with these
    /// settings): fails with `InsufficientResources` naming the numbers.
    pub fn admit(&self, store: &Store, settings: &VmSettings, what: &str) -> Result<(), ApiError> {
        let running = self.running_demand(store, Some(settings.id));
        self.capacity.admit(what, running, Demand::of(settings))
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where disks given by relative path go: `<data-dir>/Virtual Hard Disks`.
    pub fn disks_dir(&self) -> PathBuf {
        self.config.data_dir.join("Virtual Hard Disks")
    }

    pub fn state_of(&self, entry: &VmEntry) -> VmRuntime {
        if let Some(reason) = &entry.damaged {
            let mut rt = self.runtime.get(entry.id);
            if rt.state == VmState::Off {
                rt.state = VmState::Damaged;
                rt.reason = Some(reason.clone());
            }
            return rt;
        }
        let mut rt = match (&self.workers, self.runtime.get(entry.id)) {
            (Some(w), rt) if rt.state == VmState::Running => w.live(entry.id).unwrap_or(rt),
            (_, rt) => rt,
        };
        if !matches!(rt.state, VmState::Off | VmState::Saved | VmState::Critical) {
            rt.network_adapters = self.switches.connections(entry.id);
        }
        rt
    }

    pub fn vm_view(&self, entry: &VmEntry) -> Vm {
        Vm {
            id: entry.id,
            name: entry.name(),
            settings: entry.settings.clone(),
            runtime: self.state_of(entry),
            damaged_reason: entry.damaged.clone(),
            pending_merges: crate::checkpoints::tree::load(&entry.dir)
                .map(|t| crate::checkpoints::pending_merges(self, entry.id, &entry.dir, &t))
                .unwrap_or_default(),
        }
    }

    pub fn summary(&self, entry: &VmEntry) -> VmSummary {
        VmSummary {
            id: entry.id,
            name: entry.name(),
            state: self.state_of(entry).state,
            generation: entry.settings.as_ref().map(|s| s.generation),
            processor_count: entry.settings.as_ref().map(|s| s.processor.count),
            memory_mib: entry.settings.as_ref().map(|s| s.memory.startup_mib),
            damaged_reason: entry.damaged.clone(),
        }
    }

    /// Records a VM's runtime state and publishes the change (the worker's hook).
    pub fn set_runtime(&self, id: Uuid, runtime: VmRuntime) {
        let store = self.store();
        self.runtime.set(id, runtime);
        if let Some(entry) = store.get(id) {
            self.events.publish(EventBody::Vm {
                vm: self.summary(entry),
            });
        }
    }

    /// Creates a VM from complete settings, checking every rule.
    pub fn create_vm(&self, mut settings: VmSettings) -> Result<Vm, ApiError> {
        let mut store = self.store();
        vm_config::devices::assign_identity(&mut settings, None);
        self.check_new_settings(&store, &settings, None)?;
        let entry = store
            .save(settings)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        let vm = self.vm_view(entry);
        self.events.publish(EventBody::Vm {
            vm: self.summary(entry),
        });
        Ok(vm)
    }

    /// Applies `change` to a VM's settings, checks every rule, writes `vm.json`
    /// atomically and publishes the change. Nothing changes when any step fails.
    pub fn update_vm<T>(
        &self,
        key: &str,
        change: impl FnOnce(&mut VmSettings) -> Result<T, ApiError>,
    ) -> Result<(T, Vm), ApiError> {
        let mut store = self.store();
        let entry = find(&store, key)?;
        let Some(old) = entry.settings.clone() else {
            return Err(damaged_unreadable(entry));
        };
        self.require_off(entry)?;
        let mut new = old.clone();
        let out = change(&mut new)?;
        if new.id != old.id {
            return Err(ApiError::invalid(format!(
                "a VM's id cannot change (it is {})",
                old.id
            )));
        }
        vm_config::devices::assign_identity(&mut new, Some(&old));
        self.check_new_settings(&store, &new, Some(&old))?;
        let entry = store
            .save(new)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        self.events.publish(EventBody::Vm {
            vm: self.summary(entry),
        });
        Ok((out, self.vm_view(entry)))
    }

    /// Changes the reserve, limit and weight of a running (or paused) VM: checks the
    /// rules and admission control (when the reserve grows), writes `vm.json`, then
    /// has the worker apply them to the VM's cgroup. When the worker cannot, the
    /// settings file is put back and nothing has changed.
    pub async fn update_processor_live(
        &self,
        key: &str,
        change: impl FnOnce(&mut vm_config::ProcessorSettings),
    ) -> Result<vm_config::ProcessorSettings, ApiError> {
        let Some(workers) = self.workers.clone() else {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                "this viridiand runs no VMs (started without the worker integration)",
            ));
        };
        let (id, old, new) = {
            let mut store = self.store();
            let entry = find(&store, key)?;
            let Some(old) = entry.settings.clone() else {
                return Err(damaged_unreadable(entry));
            };
            let state = self.runtime.get(entry.id).state;
            if !matches!(state, VmState::Running | VmState::Paused) {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!("VM {} is {state:?}; change its processor settings when it is Off or Running", old.name),
                ));
            }
            let mut new = old.clone();
            change(&mut new.processor);
            if new.processor.count != old.processor.count {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {} runs with {} virtual processors; the count changes only while it is off                          (reserve, limit and weight change live)",
                        old.name, old.processor.count
                    ),
                ));
            }
            validate::validate(&new, &self.limits)?;
            if new.processor.reserve_percent > old.processor.reserve_percent {
                self.admit(
                    &store,
                    &new,
                    &format!(
                        "raise the processor reserve of running VM {} to {} %",
                        old.name, new.processor.reserve_percent
                    ),
                )?;
            }
            let entry = store
                .save(new.clone())
                .map_err(|e| ApiError::internal(error_chain(&e)))?;
            self.events.publish(EventBody::Vm {
                vm: self.summary(entry),
            });
            (entry.id, old, new)
        };
        if let Err(e) = workers.set_processor(id, new.processor).await {
            if let Err(back) = self.store().save(old) {
                tracing::error!(vm = %id, "cannot restore the settings after a failed live change: {}", error_chain(&back));
            }
            return Err(match e {
                jobs::JobError::Failed { code, description } if code == "InvalidState" => {
                    ApiError::new(ErrorCode::InvalidState, description)
                }
                jobs::JobError::Failed { description, .. } => ApiError::internal(description),
                jobs::JobError::Cancelled => ApiError::internal("the change was cancelled"),
            });
        }
        tracing::info!(vm = %id, limit = new.processor.limit_percent, weight = new.processor.relative_weight, reserve = new.processor.reserve_percent, "processor settings changed live");
        Ok(new.processor)
    }

    /// Replaces a VM's settings outright: the repair path for a damaged VM.
    pub fn replace_settings(&self, key: &str, mut settings: VmSettings) -> Result<Vm, ApiError> {
        let mut store = self.store();
        let entry = find(&store, key)?;
        vm_config::devices::assign_identity(&mut settings, entry.settings.as_ref());
        // The version only changes through `upgrade` (a client's settings without
        // it would otherwise read as version 1).
        if let Some(old) = &entry.settings {
            settings.configuration_version = old.configuration_version;
        }
        if settings.id != entry.id {
            return Err(ApiError::invalid(format!(
                "the settings carry id {}, but the VM's id is {}; keep the id",
                settings.id, entry.id
            )));
        }
        self.require_off(entry)?;
        self.check_new_settings(&store, &settings, None)?;
        let entry = store
            .save(settings)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        self.events.publish(EventBody::Vm {
            vm: self.summary(entry),
        });
        Ok(self.vm_view(entry))
    }

    fn require_off(&self, entry: &VmEntry) -> Result<(), ApiError> {
        let state = self.runtime.get(entry.id).state;
        if state != VmState::Off {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("VM {} is {state:?}; turn it off first", entry.name()),
            ));
        }
        Ok(())
    }

    /// The rules for settings of a running VM changed in place (an adapter's
    /// options): the pure rules only, as nothing else changes.
    pub fn check_running_settings(&self, new: &VmSettings) -> Result<(), ApiError> {
        validate::validate(new, &self.limits)?;
        Ok(())
    }

    /// Every rule for settings about to be written: the pure rules, a unique name,
    /// disks and MACs not used elsewhere, and the files of new or changed drives.
    fn check_new_settings(
        &self,
        store: &Store,
        new: &VmSettings,
        old: Option<&VmSettings>,
    ) -> Result<(), ApiError> {
        validate::validate(new, &self.limits)?;
        // A name being set must be visible text and not look like an id; a VM
        // stored under an older, laxer rule keeps its name through other changes.
        let kept_name = store
            .get(new.id)
            .and_then(|e| e.settings.as_ref())
            .is_some_and(|s| s.name == new.name);
        if !kept_name {
            validate::validate_new_name(&new.name)?;
        }
        if let Some(other) = store.others(new.id).find(|o| o.name == new.name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "a VM named {:?} already exists ({}); VM names are unique on a host",
                    new.name, other.id
                ),
            ));
        }
        validate::check_against_others(new, store.others(new.id))?;
        let mut changed = new.clone();
        changed
            .drives
            .retain(|d| !old.is_some_and(|o| o.drives.contains(d)));
        validate::check_files(&changed)?;
        for d in &changed.drives {
            self.roots.media(&d.media)?;
        }
        Ok(())
    }
}

pub fn find<'a>(store: &'a Store, key: &str) -> Result<&'a VmEntry, ApiError> {
    store.find(key).ok_or_else(|| {
        ApiError::not_found(format!(
            "no VM is named or has the id {key:?}; `GET /v1/vms` lists the VMs"
        ))
    })
}

pub fn damaged_unreadable(entry: &VmEntry) -> ApiError {
    ApiError::new(
        ErrorCode::Damaged,
        format!(
            "VM {} is damaged ({}); replace its settings with PUT /v1/vms/{}/settings or delete it",
            entry.id,
            entry
                .damaged
                .as_deref()
                .unwrap_or("its settings cannot be read"),
            entry.id
        ),
    )
}

//! The agent's outside sources, live range feeds and the CrowdSec bouncer, run as tasks on
//! the daemon's runtime. They never touch the maps themselves: they ask the worker that owns
//! them (`Ask`), through the same reload and entry paths everything else uses, and the worker
//! publishes back the config it runs (`View`), which the tasks follow.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use super::{claims, crowdsec, feeds, fleet};
use crate::model::{
    agent::{CrowdSecSettings, FeedSettings},
    fleet::{FailCount, FleetSettings, Revision},
    Config,
};

/// What a task asks of the worker.
pub enum Ask {
    /// Reload a feed group with these prefixes, then save the copy; answers a summary.
    Feed(feeds::Update, oneshot::Sender<Result<String, String>>),
    /// Apply a source's block claims.
    Claims(claims::Batch, oneshot::Sender<claims::Outcome>),
    /// The fleet's dynamic allows; `full`: `set` is all of them.
    FleetAllows {
        full: bool,
        set: Vec<(ipnet::IpNet, Option<std::time::Duration>)>,
        release: Vec<ipnet::IpNet>,
    },
    /// Other gates' failure counts (`None`: gone); `full`: all of them.
    RemoteFailures {
        full: bool,
        counts: Vec<(std::net::IpAddr, String, Option<FailCount>)>,
    },
    /// Other gates' sightings, for the proxy's detections.
    RemoteSeen(Vec<crate::ipc::Seen>),
    /// A fleet config revision to validate and apply whole, or refuse.
    FleetConfig(Box<Revision>, i64, oneshot::Sender<Result<String, String>>),
}

/// Hands an `Ask` to the worker; false when the worker has stopped.
pub type Sink = Arc<dyn Fn(Ask) -> bool + Send + Sync>;

/// The parts of the running config the tasks follow.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub feeds: FeedSettings,
    pub crowdsec: Option<CrowdSecSettings>,
    pub fleet: Option<FleetSettings>,
}

impl View {
    pub fn of(config: &Config) -> View {
        View {
            feeds: config.feeds.clone(),
            crowdsec: config.crowdsec.clone(),
            fleet: config.fleet.clone(),
        }
    }
}

/// The worker's handle on the tasks.
pub struct Agent {
    view: watch::Sender<Arc<View>>,
    refresh: mpsc::Sender<feeds::RefreshRequest>,
    feeds: Arc<Mutex<Vec<feeds::FeedStatus>>>,
    crowdsec: Arc<Mutex<Option<crowdsec::CrowdSecStatus>>>,
    /// The fleet task (idle without `[fleet]`).
    pub fleet: fleet::Fleet,
}

impl Agent {
    /// Starts the feed and CrowdSec tasks on `runtime`.
    pub fn start(config: &Config, sink: Sink, runtime: &tokio::runtime::Handle) -> Agent {
        let (view, watched) = watch::channel(Arc::new(View::of(config)));
        let (refresh, requests) = mpsc::channel(8);
        let feeds: Arc<Mutex<Vec<feeds::FeedStatus>>> = Default::default();
        let crowdsec: Arc<Mutex<Option<crowdsec::CrowdSecStatus>>> = Default::default();
        runtime.spawn(feeds::run(
            watched.clone(),
            requests,
            feeds.clone(),
            sink.clone(),
        ));
        let fleet = fleet::Fleet::start(watched.clone(), sink.clone(), runtime);
        runtime.spawn(crowdsec::run(watched, crowdsec.clone(), sink));
        Agent {
            fleet,
            view,
            refresh,
            feeds,
            crowdsec,
        }
    }

    /// The worker runs `config` now.
    pub fn publish(&self, config: &Config) {
        let view = View::of(config);
        self.view.send_if_modified(|v| {
            let changed = **v != view;
            if changed {
                *v = Arc::new(view);
            }
            changed
        });
    }

    /// Fetches one feed, or all, now; the answer goes to `reply`.
    pub fn refresh(&self, group: Option<String>, reply: oneshot::Sender<Result<String, String>>) {
        let req = feeds::RefreshRequest { group, reply };
        if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) =
            self.refresh.try_send(req)
        {
            let _ = r
                .reply
                .send(Err("the feed task is busy or gone; try again".into()));
        }
    }

    pub fn feeds_status(&self) -> Vec<feeds::FeedStatus> {
        self.feeds.lock().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn crowdsec_status(&self) -> Option<crowdsec::CrowdSecStatus> {
        self.crowdsec.lock().ok().and_then(|c| c.clone())
    }
}

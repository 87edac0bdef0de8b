//! The VM's one event-loop thread (`event-manager`): device work that is not a vCPU exit, such as
//! moving console input into the UART. It sleeps in epoll until an fd is ready.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::error::Error;
use crate::vstate::run_state::RunState;

/// A subscriber as the event loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event manager of one VM.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
}

/// Drains the VM's wake-up eventfd so the loop can re-check the exiting and pause flags.
struct Wakeup(Arc<RunState>);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.loop_wakeup, EventSet::IN)) {
            log::error!("event loop: cannot watch the wake-up eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.loop_wakeup.read();
    }
}

impl EventLoop {
    /// An event loop that stops when `state` says the VM is exiting.
    pub fn new(state: &Arc<RunState>) -> Result<Self, Error> {
        let mut manager = EventManager::new().map_err(|e| Error::Setup {
            what: "event loop",
            reason: format!("{e:?}"),
        })?;
        let wakeup: Subscriber = Arc::new(Mutex::new(Wakeup(state.clone())));
        manager.add_subscriber(wakeup);
        Ok(Self { manager })
    }

    /// Adds a device's subscriber.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Dispatches events until the VM is exiting, parking between dispatches while the VM is
    /// paused (so no device work happens then).
    pub fn run(mut self, state: &RunState) {
        while !state.is_exiting() {
            state.park_while_paused();
            if let Err(e) = self.manager.run_with_timeout(-1) {
                log::error!("event loop stopped: {e:?}");
                return;
            }
        }
    }
}

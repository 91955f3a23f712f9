//! The daemon's life cycle, INIT → READY → RUNNING → STOPPED, with every
//! transition checked in one place so that the API can answer an illegal
//! request with a conflict instead of acting on it.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

pub use lode_common::api::DaemonState;

/// What moves the daemon from one state to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateEvent {
    /// A FUSE connection exists: mounted, or received from a supervisor.
    FuseReady,
    /// `PUT /daemon/start` (or start-up without a supervisor): serve requests.
    Start,
    /// `PUT /daemon/exit`, a signal, or the session's end.
    Stop,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("daemon state {from}: {event:?} not allowed")]
pub struct IllegalTransition {
    pub from: DaemonState,
    pub event: StateEvent,
}

/// The state after `event` in `from`, if that is a legal move.
pub fn next(from: DaemonState, event: StateEvent) -> Result<DaemonState, IllegalTransition> {
    use DaemonState::*;
    match (from, event) {
        (Init, StateEvent::FuseReady) => Ok(Ready),
        (Ready, StateEvent::Start) => Ok(Running),
        (Init | Ready | Running, StateEvent::Stop) => Ok(Stopped),
        _ => Err(IllegalTransition { from, event }),
    }
}

/// The current state, shared by the API and the daemon's threads.
#[derive(Debug)]
pub struct StateMachine {
    state: Mutex<DaemonState>,
    changed: Condvar,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(DaemonState::Init),
            changed: Condvar::new(),
        }
    }

    pub fn get(&self) -> DaemonState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `event`; returns the new state or leaves the state unchanged.
    pub fn apply(&self, event: StateEvent) -> Result<DaemonState, IllegalTransition> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let to = next(*state, event)?;
        tracing::info!(from = %*state, to = %to, "daemon state");
        *state = to;
        self.changed.notify_all();
        Ok(to)
    }

    /// Waits until the state is `wanted` or `deadline` passes; true if reached.
    pub fn wait_for(&self, wanted: DaemonState, deadline: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *state != wanted {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use DaemonState::*;

    #[test]
    fn legal_path_and_every_illegal_move() {
        let all = [Init, Ready, Running, Stopped];
        let events = [StateEvent::FuseReady, StateEvent::Start, StateEvent::Stop];
        let legal = [
            (Init, StateEvent::FuseReady, Ready),
            (Ready, StateEvent::Start, Running),
            (Init, StateEvent::Stop, Stopped),
            (Ready, StateEvent::Stop, Stopped),
            (Running, StateEvent::Stop, Stopped),
        ];
        for from in all {
            for event in events {
                let expected = legal
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                assert_eq!(next(from, event).ok(), expected, "{from} {event:?}");
            }
        }
    }

    #[test]
    fn machine_refuses_and_keeps_state_on_illegal_event() {
        let m = StateMachine::new();
        assert_eq!(
            m.apply(StateEvent::Start),
            Err(IllegalTransition {
                from: Init,
                event: StateEvent::Start
            })
        );
        assert_eq!(m.get(), Init);
        assert_eq!(m.apply(StateEvent::FuseReady), Ok(Ready));
        assert_eq!(m.apply(StateEvent::Start), Ok(Running));
        assert!(m.apply(StateEvent::FuseReady).is_err());
        assert_eq!(m.get(), Running);
    }

    #[test]
    fn wait_for_sees_a_change_from_another_thread() {
        let m = Arc::new(StateMachine::new());
        let other = Arc::clone(&m);
        let t = std::thread::spawn(move || {
            other.apply(StateEvent::FuseReady).unwrap();
        });
        assert!(m.wait_for(Ready, Instant::now() + Duration::from_secs(10)));
        t.join().unwrap();
        assert!(!m.wait_for(Running, Instant::now() + Duration::from_millis(20)));
    }
}

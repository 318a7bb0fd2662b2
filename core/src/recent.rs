//! Recently freed stream ids, shared by the relay and the gateway: a late message for one of them
//! is a normal race, dropped quietly instead of answered as unknown.

use heapless::Deque;

use crate::stream_id::StreamId;

/// The last `N` freed stream ids, oldest first.
#[derive(Debug)]
pub(crate) struct RecentlyClosed<const N: usize> {
    ids: Deque<StreamId, N>,
}

impl<const N: usize> RecentlyClosed<N> {
    /// No id remembered.
    pub(crate) const fn new() -> Self {
        Self { ids: Deque::new() }
    }

    /// Remembers a freed id, forgetting the oldest when full.
    pub(crate) fn remember(&mut self, id: StreamId) {
        if self.ids.is_full() {
            self.ids.pop_front();
        }
        let _ = self.ids.push_back(id);
    }

    /// Forgets `id` (it names a live stream again).
    pub(crate) fn forget(&mut self, id: &StreamId) {
        self.ids.retain(|old| old != id);
    }

    /// Whether `id` (a `&str` or an escaped JSON string) names a recently freed stream.
    pub(crate) fn contains<Q: PartialEq<str> + ?Sized>(&self, id: &Q) -> bool {
        self.ids.iter().any(|old| *id == *old.as_str())
    }
}

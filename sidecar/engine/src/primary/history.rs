//! Dirty-page history: which pages changed at each epoch of this run, so that a backup that fell behind (or
//! came back) is resynced with only the pages changed since the epoch it holds, not all of guest RAM.

use std::collections::BTreeMap;

use endophyte_vmm::DirtyBitmap;
use endophyte_wire::EpochStart;

/// Epochs of history kept; a backup further behind gets all of RAM.
pub(super) const HISTORY_EPOCHS: usize = 4096;

/// Which pages a resync sends.
pub(super) enum PageSet {
    /// Every page of guest RAM.
    All,
    /// The pages set in these bitmaps (one per region).
    Union(Vec<DirtyBitmap>),
}

impl PageSet {
    /// Whether page `index` of region `region` is in the set.
    pub fn contains(&self, region: usize, index: u64) -> bool {
        match self {
            Self::All => true,
            Self::Union(b) => b.get(region).is_some_and(|b| b.is_set(index)),
        }
    }
}

/// Backups that (re)joined and need the same pages before an epoch's own: all of RAM (`from: None`), or
/// what changed since the epoch `from` they hold.
pub(super) struct ResyncGroup {
    /// The epoch they hold, when the history covers it.
    pub from: Option<u64>,
    /// The pages to send them.
    pub set: PageSet,
    /// The backups.
    pub backups: Vec<usize>,
}

/// The changed pages of each epoch of this sidecar's session.
pub(super) struct History {
    session: u64,
    epochs: BTreeMap<u64, Vec<DirtyBitmap>>,
}

impl History {
    /// An empty history of session `session`.
    pub fn new(session: u64) -> Self {
        Self {
            session,
            epochs: BTreeMap::new(),
        }
    }

    /// Whether the history says what changed after epoch `from` of session `from_session`: only an epoch
    /// this run cut and still remembers does (history is pruned from the oldest end only, so every epoch
    /// cut after it is there too). An empty replica, another session's epoch or a pruned one do not.
    pub fn covers(&self, from: u64, from_session: u64) -> bool {
        from_session == self.session && self.epochs.contains_key(&from)
    }

    /// Pages changed after epoch `from`, up to (not including) epoch `e`'s own changes.
    pub fn since(&self, from: u64, e: u64) -> PageSet {
        let mut acc: Option<Vec<DirtyBitmap>> = None;
        for (_, bms) in self.epochs.range(from + 1..e) {
            match &mut acc {
                None => acc = Some(bms.clone()),
                Some(a) => a.iter_mut().zip(bms).for_each(|(x, y)| x.or_assign(y)),
            }
        }
        PageSet::Union(acc.unwrap_or_default())
    }

    /// The resync groups of epoch `e`, from each backup's [`EpochStart`]: backups that need the same pages
    /// share one group (and one encoding).
    pub fn resync_groups(&self, starts: &[EpochStart], e: u64) -> Vec<ResyncGroup> {
        let mut keys: Vec<(Option<u64>, Vec<usize>)> = Vec::new();
        for (b, s) in starts.iter().enumerate() {
            if let EpochStart::Resync { from, from_session } = *s {
                let key = self.covers(from, from_session).then_some(from);
                match keys.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, bs)) => bs.push(b),
                    None => keys.push((key, vec![b])),
                }
            }
        }
        keys.into_iter()
            .map(|(from, backups)| ResyncGroup {
                set: match from {
                    Some(from) => self.since(from, e),
                    None => PageSet::All,
                },
                from,
                backups,
            })
            .collect()
    }

    /// Records what changed at epoch `e`, forgetting the oldest epochs beyond [`HISTORY_EPOCHS`].
    pub fn insert(&mut self, e: u64, changed: Vec<DirtyBitmap>) {
        self.epochs.insert(e, changed);
        while self.epochs.len() > HISTORY_EPOCHS {
            self.epochs.pop_first();
        }
    }
}

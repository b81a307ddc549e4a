//! Dirty-page bitmaps of one guest RAM region, and their coalescing into `{gpa, len}` ranges.
//!
//! Bit `i` of word `i / 64` (least significant bit first) stands for the page at
//! `base_gpa + i * page_size`. This is the layout of KVM's `KVM_GET_DIRTY_LOG` bitmap
//! (Documentation/virt/kvm/api.rst, 4.8) on a little-endian host, so a bitmap from KVM can be used as is.

use serde::{Deserialize, Serialize};

/// A contiguous run of guest physical memory: `len_bytes` bytes from `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpaRange {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len_bytes: u64,
}

/// One bit per page of a guest RAM region: set = the page was written since the last harvest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    base_gpa: u64,
    page_size: u64,
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages of `page_size` bytes starting at `base_gpa`.
    pub fn new(base_gpa: u64, page_size: u64, pages: u64) -> Self {
        Self {
            base_gpa,
            page_size,
            pages,
            words: vec![0; words_for(pages)],
        }
    }

    /// Wraps `words` (KVM layout) as the bitmap of `pages` pages. Bits past `pages` are cleared.
    ///
    /// # Panics
    /// If `words.len()` is not `ceil(pages / 64)`.
    pub fn from_words(base_gpa: u64, page_size: u64, pages: u64, mut words: Vec<u64>) -> Self {
        assert_eq!(
            words.len(),
            words_for(pages),
            "bitmap of {pages} pages needs {} words",
            words_for(pages)
        );
        let tail = pages % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        Self {
            base_gpa,
            page_size,
            pages,
            words,
        }
    }

    /// Guest physical address of the region's first page.
    pub fn base_gpa(&self) -> u64 {
        self.base_gpa
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Number of pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap words (KVM layout).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Mutable access to the words; callers must keep bits past `pages()` clear.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Marks page `index` (relative to the region) dirty.
    ///
    /// # Panics
    /// If `index >= pages()`.
    pub fn set(&mut self, index: u64) {
        assert!(
            index < self.pages,
            "page {index} outside a bitmap of {} pages",
            self.pages
        );
        self.words[(index / 64) as usize] |= 1 << (index % 64);
    }

    /// Whether page `index` is dirty; pages outside the bitmap are clean.
    pub fn is_set(&self, index: u64) -> bool {
        index < self.pages && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// ORs `words` (same layout and length) into this bitmap.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn or_words(&mut self, words: &[u64]) {
        assert_eq!(words.len(), self.words.len(), "bitmap length mismatch");
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= *b;
        }
    }

    /// ORs another bitmap of the same region into this one.
    ///
    /// # Panics
    /// If the two bitmaps describe different regions.
    pub fn or_assign(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            (self.base_gpa, self.page_size, self.pages),
            (other.base_gpa, other.page_size, other.pages),
            "bitmaps of different regions"
        );
        self.or_words(&other.words);
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Iterates over the indices (relative to the region) of dirty pages, in increasing order.
    pub fn iter_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// Coalesces runs of dirty pages into maximal `{gpa, len}` ranges, in increasing GPA order.
    ///
    /// Works a word at a time: whole clean and whole dirty words are skipped in one step, so the cost is
    /// proportional to the number of words plus the number of ranges.
    pub fn ranges(&self) -> Vec<GpaRange> {
        let mut out = Vec::new();
        let mut run_start: Option<u64> = None; // page index where the current run started
        for (wi, &word) in self.words.iter().enumerate() {
            let base = wi as u64 * 64;
            let mut w = word;
            let mut pos = 0u32; // bits of this word already consumed
            loop {
                match run_start {
                    None => {
                        if w == 0 {
                            break;
                        }
                        let tz = w.trailing_zeros();
                        run_start = Some(base + u64::from(pos + tz));
                        pos += tz;
                        w = if tz == 64 { 0 } else { w >> tz };
                    }
                    Some(start) => {
                        let ones = (!w).trailing_zeros(); // length of the run of ones at the bottom
                        let ones = ones.min(64 - pos);
                        pos += ones;
                        if pos >= 64 {
                            break; // run continues into the next word
                        }
                        w >>= ones;
                        let end = base + u64::from(pos);
                        out.push(self.range(start, end));
                        run_start = None;
                    }
                }
            }
        }
        if let Some(start) = run_start {
            out.push(self.range(start, self.pages));
        }
        out
    }

    fn range(&self, start_page: u64, end_page: u64) -> GpaRange {
        GpaRange {
            gpa: self.base_gpa + start_page * self.page_size,
            len_bytes: (end_page - start_page) * self.page_size,
        }
    }
}

/// Number of `u64` words a bitmap of `pages` pages needs.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_ranges(bm: &DirtyBitmap) -> Vec<GpaRange> {
        let mut out: Vec<GpaRange> = Vec::new();
        for p in 0..bm.pages() {
            if !bm.is_set(p) {
                continue;
            }
            let gpa = bm.base_gpa() + p * bm.page_size();
            match out.last_mut() {
                Some(r) if r.gpa + r.len_bytes == gpa => r.len_bytes += bm.page_size(),
                _ => out.push(GpaRange {
                    gpa,
                    len_bytes: bm.page_size(),
                }),
            }
        }
        out
    }

    #[test]
    fn ranges_across_word_boundaries() {
        let mut bm = DirtyBitmap::new(0x10_0000, 4096, 200);
        for p in [0, 1, 2, 63, 64, 65, 127, 128, 199] {
            bm.set(p);
        }
        assert_eq!(
            bm.ranges(),
            vec![
                GpaRange {
                    gpa: 0x10_0000,
                    len_bytes: 3 * 4096
                },
                GpaRange {
                    gpa: 0x10_0000 + 63 * 4096,
                    len_bytes: 3 * 4096
                },
                GpaRange {
                    gpa: 0x10_0000 + 127 * 4096,
                    len_bytes: 2 * 4096
                },
                GpaRange {
                    gpa: 0x10_0000 + 199 * 4096,
                    len_bytes: 4096
                },
            ]
        );
    }

    #[test]
    fn full_bitmap_is_one_range() {
        let bm = DirtyBitmap::from_words(0, 4096, 130, vec![u64::MAX; 3]);
        assert_eq!(bm.count(), 130, "bits past the end must be cleared");
        assert_eq!(
            bm.ranges(),
            vec![GpaRange {
                gpa: 0,
                len_bytes: 130 * 4096
            }]
        );
    }

    proptest! {
        #[test]
        fn ranges_match_naive(pages in 1u64..700, seed in proptest::collection::vec(any::<u64>(), 11)) {
            let words: Vec<u64> = seed.iter().cycle().take(words_for(pages)).copied().collect();
            let bm = DirtyBitmap::from_words(0x4000, 4096, pages, words);
            let ranges = bm.ranges();
            prop_assert_eq!(&ranges, &naive_ranges(&bm));
            let total: u64 = ranges.iter().map(|r| r.len_bytes / 4096).sum();
            prop_assert_eq!(total, bm.count());
            let via_iter: Vec<u64> = bm.iter_pages().collect();
            let via_is_set: Vec<u64> = (0..pages).filter(|&p| bm.is_set(p)).collect();
            prop_assert_eq!(via_iter, via_is_set);
        }
    }
}

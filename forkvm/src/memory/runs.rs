//! Sets of pages as runs: (first page, count) pairs, and the set arithmetic a freeze needs.
//!
//! A list of runs is *sorted and disjoint* when each run starts where the previous one ends or
//! later (they may touch), and *canonical* when, besides, no two touch and none is empty: then a
//! set of pages has exactly one list of runs.

/// `runs` (first page, count) sorted, with overlapping or touching runs made one.
pub(super) fn merged(mut runs: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    runs.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
    for (first, count) in runs {
        match out.last_mut() {
            Some((f, c)) if *f + *c >= first => *c = (*c).max(first + count - *f),
            _ => out.push((first, count)),
        }
    }
    out
}

/// The pages of the sorted, disjoint runs `a` that are in none of the sorted, disjoint runs `b`.
pub(super) fn subtract(
    a: &[(usize, usize)],
    b: impl IntoIterator<Item = (usize, usize)>,
) -> Vec<(usize, usize)> {
    let mut b = b.into_iter().peekable();
    let mut out = Vec::new();
    for &(first, count) in a {
        let (mut at, end) = (first, first + count);
        while at < end {
            // Skip runs of `b` that end before `at`.
            while b.next_if(|&(f, c)| f + c <= at).is_some() {}
            match b.peek() {
                Some(&(f, c)) if f < end => {
                    if f > at {
                        out.push((at, f - at));
                    }
                    at = f + c;
                }
                _ => {
                    out.push((at, end - at));
                    at = end;
                }
            }
        }
    }
    out
}

/// Runs of `true` in `flags`, as (first index, length).
pub(super) fn runs(flags: &[bool]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] {
            let first = i;
            while i < flags.len() && flags[i] {
                i += 1;
            }
            runs.push((first, i - first));
        } else {
            i += 1;
        }
    }
    runs
}

/// Property tests against a model: a set of pages as one flag per page.
#[cfg(test)]
mod tests {
    use super::*;

    /// Pages the model covers; runs end at most here.
    const PAGES: usize = 96;
    /// Random cases per property.
    const CASES: usize = 2000;

    /// SplitMix64: a small deterministic pseudo-random generator, so that a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A number in `0..n`.
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Random flags, each set with a probability that itself varies from case to case, so
        /// that sparse, dense, empty and full sets all come up.
        fn flags(&mut self) -> Vec<bool> {
            let density = self.below(11);
            (0..PAGES).map(|_| self.below(10) < density).collect()
        }

        /// Runs in any order, overlapping and touching at random, none empty.
        fn any_runs(&mut self) -> Vec<(usize, usize)> {
            (0..self.below(12))
                .map(|_| {
                    let first = self.below(PAGES);
                    (first, 1 + self.below(PAGES - first))
                })
                .collect()
        }

        /// Sorted, disjoint runs, none empty, that touch now and then: the runs of random flags,
        /// some of them split in two.
        fn disjoint_runs(&mut self) -> Vec<(usize, usize)> {
            let mut out = Vec::new();
            for (first, count) in runs(&self.flags()) {
                if count > 1 && self.below(3) == 0 {
                    let cut = 1 + self.below(count - 1);
                    out.extend([(first, cut), (first + cut, count - cut)]);
                } else {
                    out.push((first, count));
                }
            }
            out
        }
    }

    /// The model of `runs`: one flag per page of `0..PAGES`.
    fn model(runs: &[(usize, usize)]) -> Vec<bool> {
        let mut flags = vec![false; PAGES];
        for &(first, count) in runs {
            flags[first..first + count].fill(true);
        }
        flags
    }

    fn is_sorted_and_disjoint(runs: &[(usize, usize)]) -> bool {
        runs.iter().all(|&(_, count)| count > 0)
            && runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
    }

    fn is_canonical(runs: &[(usize, usize)]) -> bool {
        runs.iter().all(|&(_, count)| count > 0)
            && runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0)
    }

    #[test]
    fn runs_of_flags_are_canonical_and_cover_exactly_the_set_flags() {
        let mut rng = Rng(1);
        for _ in 0..CASES {
            let flags = rng.flags();
            let r = runs(&flags);
            assert!(is_canonical(&r), "{r:?}");
            assert_eq!(model(&r), flags, "{r:?}");
        }
        assert_eq!(runs(&[]), []);
    }

    #[test]
    fn merged_runs_are_the_canonical_runs_of_their_union() {
        let mut rng = Rng(2);
        for _ in 0..CASES {
            let any = rng.any_runs();
            let m = merged(any.clone());
            // Canonical runs of one set are unique: those of the union's flags.
            assert_eq!(m, runs(&model(&any)), "merged({any:?})");
            assert_eq!(merged(m.clone()), m, "merging again changes nothing");
        }
        assert_eq!(merged(Vec::new()), []);
    }

    #[test]
    fn subtracting_keeps_exactly_the_pages_of_a_not_in_b() {
        let mut rng = Rng(3);
        for _ in 0..CASES {
            let (a, b) = (rng.disjoint_runs(), rng.disjoint_runs());
            let d = subtract(&a, b.iter().copied());
            let expected: Vec<bool> = model(&a)
                .iter()
                .zip(model(&b))
                .map(|(&in_a, in_b)| in_a && !in_b)
                .collect();
            assert_eq!(model(&d), expected, "{a:?} - {b:?} = {d:?}");
            assert!(is_sorted_and_disjoint(&d), "{a:?} - {b:?} = {d:?}");
            // From canonical runs, canonical runs.
            let canonical = merged(a.clone());
            let d = subtract(&canonical, b.iter().copied());
            assert!(is_canonical(&d), "{canonical:?} - {b:?} = {d:?}");
            assert_eq!(d, runs(&expected));
        }
    }

    #[test]
    fn subtracting_what_subtracting_leaves_intersects() {
        // How a freeze finds the pages it copied that the RAM no longer holds.
        let mut rng = Rng(4);
        for _ in 0..CASES {
            let a = merged(rng.any_runs());
            let b = rng.disjoint_runs();
            let both = subtract(&a, subtract(&a, b.iter().copied()));
            let expected: Vec<bool> = model(&a)
                .iter()
                .zip(model(&b))
                .map(|(&in_a, in_b)| in_a && in_b)
                .collect();
            assert_eq!(both, runs(&expected), "{a:?} and {b:?}");
        }
    }

    #[test]
    fn subtracting_nothing_or_everything() {
        let mut rng = Rng(5);
        for _ in 0..CASES {
            let a = rng.disjoint_runs();
            assert_eq!(subtract(&a, []), a);
            assert_eq!(subtract(&a, [(0, PAGES)]), []);
            assert_eq!(subtract(&[], a.iter().copied()), []);
        }
    }
}

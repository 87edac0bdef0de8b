//! A small slab: entries keep their index for life, freed indices are reused (the flow tables'
//! storage; an index doubles as the epoll token of the entry's host socket).

/// Entries addressed by a stable index.
pub(crate) struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value` and returns its index.
    pub(crate) fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        if let Some(index) = self.free.pop()
            && let Some(slot) = self.entries.get_mut(index)
        {
            *slot = Some(value);
            return index;
        }
        self.entries.push(Some(value));
        self.entries.len() - 1
    }

    /// Takes the entry at `index` out.
    pub(crate) fn remove(&mut self, index: usize) -> Option<T> {
        let value = self.entries.get_mut(index)?.take()?;
        self.len -= 1;
        self.free.push(index);
        Some(value)
    }

    pub(crate) fn get(&self, index: usize) -> Option<&T> {
        self.entries.get(index)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.entries.get_mut(index)?.as_mut()
    }

    /// Entries stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The indices in use, ascending.
    pub(crate) fn indices(&self) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| entry.as_ref().map(|_| index))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn indices_are_stable_and_reused() {
        let mut slab = Slab::default();
        let a = slab.insert('a');
        let b = slab.insert('b');
        assert_eq!(slab.remove(a), Some('a'));
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get(b), Some(&'b'));
        let c = slab.insert('c');
        assert_eq!(c, a);
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.indices(), vec![a, b]);
    }
}

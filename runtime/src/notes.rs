//! Typed notes: what a layer adds to a request or an answer for the layers after it and for the
//! caller (a route, a contract verdict, a price, a review decision), as `http`'s `Extensions`
//! carry typed values on a request. Each note is a type of its own module; the engine copies a
//! request's notes onto its answer without knowing any of them, and lineage records each by its
//! key as JSON.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A value a layer attaches to a request or an answer.
///
/// ```
/// use keel::{Note, Notes};
/// #[derive(Debug)]
/// struct Shift(u32);
/// impl Note for Shift {
///     fn key(&self) -> &'static str { "shift" }
///     fn to_json(&self) -> serde_json::Value { self.0.into() }
/// }
/// let mut notes = Notes::default();
/// notes.insert(Shift(3));
/// assert_eq!(notes.get::<Shift>().map(|s| s.0), Some(3));
/// assert_eq!(notes.to_json()["shift"], 3);
/// ```
pub trait Note: Any + Send + Sync + fmt::Debug {
    /// The name it is known by in JSON (the lineage record, the C ABI, HTTP): one per type.
    fn key(&self) -> &'static str;
    /// Its JSON form.
    fn to_json(&self) -> serde_json::Value;
}

/// The notes of a request or an answer: at most one of each type. Cheap to clone (the notes
/// are shared).
#[derive(Clone, Default)]
pub struct Notes(Vec<Arc<dyn Note>>);

impl Notes {
    /// Adds `note`, replacing a note of the same type.
    pub fn insert<T: Note>(&mut self, note: T) {
        self.0.retain(|n| !is::<T>(n.as_ref()));
        self.0.push(Arc::new(note));
    }

    /// The note of type `T`, if there is one.
    pub fn get<T: Note>(&self) -> Option<&T> {
        self.0
            .iter()
            .find_map(|n| (n.as_ref() as &dyn Any).downcast_ref::<T>())
    }

    /// Removes the note of type `T` and returns it.
    pub fn take<T: Note>(&mut self) -> Option<Arc<T>> {
        let at = self.0.iter().position(|n| is::<T>(n.as_ref()))?;
        let note: Arc<dyn Any + Send + Sync> = self.0.remove(at);
        note.downcast::<T>().ok()
    }

    /// Takes `others`' notes, replacing those of the same types.
    pub fn extend(&mut self, others: &Notes) {
        for n in &others.0 {
            self.0
                .retain(|mine| mine.as_ref().type_id() != n.as_ref().type_id());
            self.0.push(n.clone());
        }
    }

    /// Every note, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Note> {
        self.0.iter().map(|n| n.as_ref())
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every note's JSON, by key (a note whose JSON is null is not told: it is for the layers
    /// only).
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        self.iter()
            .map(|n| (n.key().to_string(), n.to_json()))
            .filter(|(_, v)| !v.is_null())
            .collect()
    }
}

fn is<T: Note>(n: &dyn Note) -> bool {
    (n as &dyn Any).is::<T>()
}

impl fmt::Debug for Notes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

/// Notes are equal when they say the same, key by key.
impl PartialEq for Notes {
    fn eq(&self, other: &Self) -> bool {
        self.to_json() == other.to_json()
    }
}

use std::fmt;

/// What went wrong, for callers that decide by kind (retry, 503, refuse to start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusErrorKind {
    /// Could not connect to the server.
    Connect,
    /// The server is too old or runs without JetStream.
    Unsupported,
    /// No answer in time (the message may or may not have been stored).
    Timeout,
    /// JetStream (or the stream) is not answering: no responders, broken connection.
    Unavailable,
    /// The stream is full (its byte or message limit, or the server's storage): nothing was
    /// stored; the same publish can succeed once consumers have caught up.
    Full,
    /// The server answered and refused (message too large, bad request).
    Rejected,
    /// A definition under `nats/` is invalid or asks for a change the server cannot make in place.
    Definition,
}

impl BusErrorKind {
    /// Whether trying the same operation again may succeed.
    pub const fn is_transient(self) -> bool {
        matches!(self, Self::Timeout | Self::Unavailable | Self::Connect)
    }
}

/// An error from the bus, with a [`BusErrorKind`] and the context it happened in.
#[derive(Debug)]
pub struct BusError {
    kind: BusErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BusError {
    pub fn new(kind: BusErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// [`BusErrorKind::Unavailable`] with its cause: the server or a stream did not answer.
    pub(crate) fn unavailable(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::with_source(BusErrorKind::Unavailable, context, source)
    }

    pub fn with_source(
        kind: BusErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    pub fn kind(&self) -> BusErrorKind {
        self.kind
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

"""The core: events, metadata, codecs and errors. No I/O, no drivers."""

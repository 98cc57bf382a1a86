//! The metadata database handle: `lamina-metadb`, shared with the volume service.

pub(crate) use lamina_metadb::{note_io_failure, Db, ReadTxn, WriteTxn};

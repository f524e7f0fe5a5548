//! Schema changes on the source carried to the targets: captured in the stream by event
//! triggers (`capture`), turned into `Ddl` changes for the replicated tables (`command`),
//! and replayed by postgres targets at their place (`sink::postgres`). `statement` holds
//! the little SQL lexing that needs.

pub mod capture;
pub mod command;
pub mod statement;

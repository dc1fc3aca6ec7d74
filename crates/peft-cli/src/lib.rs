//! # peft-cli
//!
//! The `peft` command (`src/main.rs`) and the library behind it: dataset
//! readers ([`data`]), the training loop ([`train`]), the tasks and methods
//! it runs ([`tasks`]), the jobs of each subcommand ([`jobs`]) and the
//! server of `peft serve` ([`serve`]).

pub mod data;
pub mod jobs;
pub mod plot;
pub mod serve;
pub mod tasks;
pub mod train;

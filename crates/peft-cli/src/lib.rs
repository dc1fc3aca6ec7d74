//! # peft-cli
//!
//! The `peft` command (`src/main.rs`) and the library behind it: dataset
//! readers ([`data`]), the training loop ([`train`]), the tasks and methods
//! it runs ([`tasks`]) and the jobs of each subcommand ([`jobs`]).

pub mod data;
pub mod jobs;
pub mod plot;
pub mod tasks;
pub mod train;

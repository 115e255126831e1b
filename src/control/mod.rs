//! People and operators: the admin listener's router and API (`admin`),
//! the `key` commands (`keys`), the OAuth connect flows (`connect`) and the pages they show (`pages`),
//! and the operators' dashboard at `/ui` (`ui`).

pub mod admin;
pub mod audit;
pub mod connect;
pub mod keys;
pub mod pages;
pub mod rewrap;
pub mod token;
pub mod ui;

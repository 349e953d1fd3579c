//! IP families, and [`PerFamily`]: the one way to hold something for IPv4 and IPv6 each.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::ops::{Index, IndexMut};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn of_net(net: &IpNet) -> Family {
        Family::of(&net.addr())
    }

    /// ipset's name for the family.
    pub fn ipset_name(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One `T` for each family, indexed by [`Family`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerFamily<T> {
    pub v4: T,
    pub v6: T,
}

impl<T> PerFamily<T> {
    pub fn from_fn(mut make: impl FnMut(Family) -> T) -> PerFamily<T> {
        PerFamily {
            v4: make(Family::V4),
            v6: make(Family::V6),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Family, &T)> {
        [(Family::V4, &self.v4), (Family::V6, &self.v6)].into_iter()
    }

    pub fn map<U>(self, mut f: impl FnMut(Family, T) -> U) -> PerFamily<U> {
        PerFamily {
            v4: f(Family::V4, self.v4),
            v6: f(Family::V6, self.v6),
        }
    }

    /// `(family, value)` pairs, IPv4 first: the shape the dataplane takes.
    pub fn into_vec(self) -> Vec<(Family, T)> {
        vec![(Family::V4, self.v4), (Family::V6, self.v6)]
    }
}

impl<T> Index<Family> for PerFamily<T> {
    type Output = T;
    fn index(&self, family: Family) -> &T {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

impl<T> IndexMut<Family> for PerFamily<T> {
    fn index_mut(&mut self, family: Family) -> &mut T {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_family_indexes_and_maps_by_family() {
        let mut p = PerFamily::from_fn(|f| f.to_string());
        assert_eq!(p[Family::V4], "IPv4");
        p[Family::V6].push('!');
        assert_eq!(p.v6, "IPv6!");
        let lens = p.map(|_, s| s.len());
        assert_eq!(lens.into_vec(), vec![(Family::V4, 4), (Family::V6, 5)]);
    }
}

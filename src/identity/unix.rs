//! The identity of a process on the local Unix socket: the uid and gid the kernel reports for
//! the peer (`SO_PEERCRED`, read by the listener, never anything the client sends), the user
//! name of that uid in the system user database, and the groups the grants match
//! `unix:group=` and `unix:gid=` against: the peer's own (effective) gid, then every group
//! the user database lists the user in (`getgrouplist`: the user's primary group and its
//! supplementary groups from the group database), by number and, where the group database
//! has one, by name.

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

/// Who a Unix-socket peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixIdentity {
    /// The peer's effective user id (`SO_PEERCRED`).
    pub uid: u32,
    /// The peer's effective group id (`SO_PEERCRED`).
    pub gid: u32,
    /// The peer's process id, for audit lines.
    pub pid: Option<i32>,
    /// The name of `uid` in the user database, if it has one.
    pub user: Option<String>,
    /// Every group the grants match against, the peer's gid first.
    pub groups: Vec<UnixGroup>,
    /// `uid` as text, the value `unix:uid=` patterns compare with.
    pub(super) uid_text: String,
}

/// One group of a Unix-socket peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixGroup {
    /// The gid.
    pub gid: u32,
    /// Its name in the group database, if it has one.
    pub name: Option<String>,
    /// `gid` as text, the value `unix:gid=` patterns compare with.
    pub(super) gid_text: String,
}

impl UnixGroup {
    /// A group by number and, when known, name.
    pub fn new(gid: u32, name: Option<String>) -> UnixGroup {
        UnixGroup {
            gid,
            name,
            gid_text: gid.to_string(),
        }
    }
}

impl UnixIdentity {
    /// An identity from what the kernel and the databases said.
    pub fn new(
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        user: Option<String>,
        groups: Vec<UnixGroup>,
    ) -> UnixIdentity {
        UnixIdentity {
            uid,
            gid,
            pid,
            user,
            groups,
            uid_text: uid.to_string(),
        }
    }

    /// Looks the peer up in the user and group databases (blocking: NSS may ask a network
    /// service; run it off the async threads). A uid or gid without a name keeps its number
    /// only; a lookup that fails is treated like a missing name.
    pub fn lookup(uid: u32, gid: u32, pid: Option<i32>) -> UnixIdentity {
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let mut gids = vec![gid];
        if let Some(user) = &user
            && let Ok(name) = std::ffi::CString::new(user.name.as_bytes())
            && let Ok(listed) = getgrouplist(&name, user.gid)
        {
            gids.extend(listed.into_iter().map(Gid::as_raw));
        }
        let mut groups: Vec<UnixGroup> = Vec::new();
        for g in gids {
            if groups.iter().any(|known| known.gid == g) {
                continue;
            }
            let name = Group::from_gid(Gid::from_raw(g)).ok().flatten();
            groups.push(UnixGroup::new(g, name.map(|g| g.name)));
        }
        UnixIdentity::new(uid, gid, pid, user.map(|u| u.name), groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_in_the_user_and_group_databases() {
        let root = UnixIdentity::lookup(0, 0, None);
        assert_eq!(root.user.as_deref(), Some("root"));
        assert_eq!(root.groups[0], UnixGroup::new(0, Some("root".into())));
        assert_eq!(
            root.groups.iter().filter(|g| g.gid == 0).count(),
            1,
            "no duplicates"
        );
    }

    #[test]
    fn an_unknown_uid_keeps_its_number_only() {
        let ghost = UnixIdentity::lookup(4_000_000_000, 4_000_000_001, Some(1));
        assert_eq!(ghost.user, None);
        assert_eq!(ghost.groups, [UnixGroup::new(4_000_000_001, None)]);
        assert_eq!(ghost.uid_text, "4000000000");
    }
}

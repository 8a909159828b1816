//! What `REDIS_URL` names: one server, a Redis Cluster, or a master found through Sentinel.
//!
//! | form | meaning |
//! |---|---|
//! | `redis://[user:pass@]host:port[/db]`, `rediss://…` | one server (the `redis` crate's syntax) |
//! | `redis+cluster://[user:pass@]host:port[,host:port…]`, `rediss+cluster://…` | a Redis Cluster, seed nodes |
//! | `redis://host:port,redis://host:port[,…]` | the same cluster, as a list of node URLs |
//! | `redis+sentinel://[user:pass@]host:port[,host:port…]/<master>[/db]`, `rediss+sentinel://…` | the master that Sentinel names |
//!
//! Errors never repeat the URL: it may carry a password.

use redis::{ConnectionInfo, IntoConnectionInfo};

/// Where the broker's Redis is, parsed from `REDIS_URL`.
#[derive(Clone)]
pub enum RedisTopology {
    Single(ConnectionInfo),
    /// Seed nodes; the rest of the cluster is discovered from them.
    Cluster(Vec<ConnectionInfo>),
    Sentinel {
        /// The Sentinel processes to ask, without credentials.
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        /// Database, credentials and TLS for the master itself.
        master: ConnectionInfo,
    },
}

const SCHEMES: &str = "must be a redis://, rediss://, redis+cluster:// or redis+sentinel:// URL";

impl RedisTopology {
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or(SCHEMES)?;
        match scheme {
            "redis" | "rediss" if url.contains(',') => {
                let nodes = url
                    .split(',')
                    .map(|node| {
                        let node = node.trim();
                        if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                            return Err(
                                "a list of cluster nodes must be redis:// URLs separated by commas"
                                    .to_string(),
                            );
                        }
                        node_info(node)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Self::Cluster(nodes))
            }
            "redis" | "rediss" => Ok(Self::Single(node_info(url)?)),
            "redis+cluster" | "rediss+cluster" => {
                let parts = Parts::split(rest)?;
                if !parts.path.trim_matches('/').is_empty() {
                    return Err(
                        "a cluster URL has no database path (a cluster has only db 0)".into(),
                    );
                }
                let base = scheme.trim_end_matches("+cluster");
                let nodes = parts
                    .hosts
                    .iter()
                    .map(|host| node_info(&parts.node_url(base, host, true, "")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Self::Cluster(nodes))
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let parts = Parts::split(rest)?;
                let mut path = parts.path.trim_matches('/').split('/');
                let master_name = path.next().unwrap_or_default().to_string();
                if master_name.is_empty() {
                    return Err("a sentinel URL needs the master name as its path: redis+sentinel://host:port/<master>[/db]".into());
                }
                let db = match path.next() {
                    None | Some("") => "",
                    Some(db) if db.parse::<u16>().is_ok() => db,
                    Some(_) => {
                        return Err("the database after the master name must be a number".into())
                    }
                };
                if path.next().is_some() {
                    return Err("a sentinel URL's path is /<master>[/db]".into());
                }
                let base = scheme.trim_end_matches("+sentinel");
                let sentinels = parts
                    .hosts
                    .iter()
                    .map(|host| node_info(&parts.node_url(base, host, false, "")))
                    .collect::<Result<Vec<_>, _>>()?;
                // The master's address comes from Sentinel; only its settings come from here.
                let master = node_info(&parts.node_url(base, "localhost", true, db))?;
                Ok(Self::Sentinel {
                    sentinels,
                    master_name,
                    master,
                })
            }
            _ => Err(SCHEMES.into()),
        }
    }
}

/// `[userinfo@]host[,host…][/path][?query]`, after the scheme.
struct Parts<'a> {
    userinfo: Option<&'a str>,
    hosts: Vec<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Parts<'a> {
    fn split(rest: &'a str) -> Result<Self, String> {
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|host| host.is_empty()) {
            return Err("names an empty host: list nodes as host:port,host:port".into());
        }
        Ok(Self {
            userinfo,
            hosts,
            path,
            query,
        })
    }

    fn node_url(&self, scheme: &str, host: &str, credentials: bool, db: &str) -> String {
        let userinfo = match self.userinfo {
            Some(userinfo) if credentials => format!("{userinfo}@"),
            _ => String::new(),
        };
        let query = self.query.map(|q| format!("?{q}")).unwrap_or_default();
        let db = if db.is_empty() {
            String::new()
        } else {
            format!("/{db}")
        };
        format!("{scheme}://{userinfo}{host}{db}{query}")
    }
}

fn node_info(url: &str) -> Result<ConnectionInfo, String> {
    // The crate's messages name the problem, never the URL; still, only known ones are passed on.
    url.into_connection_info().map_err(|error| {
        if error.to_string().contains("TLS") {
            "rediss:// needs TLS support, which this build's Redis client does not have".into()
        } else {
            "is not a valid Redis URL (expected host:port after the scheme)".into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ConnectionAddr;

    fn tcp(info: &ConnectionInfo) -> (String, u16) {
        match &info.addr {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => panic!("not plain TCP: {other:?}"),
        }
    }

    #[test]
    fn a_single_server() {
        let RedisTopology::Single(info) = RedisTopology::parse("redis://:pw@cache:6380/2").unwrap()
        else {
            panic!("single")
        };
        assert_eq!(tcp(&info), ("cache".into(), 6380));
        assert_eq!(info.redis.db, 2);
        assert_eq!(info.redis.password.as_deref(), Some("pw"));
    }

    #[test]
    fn both_cluster_forms_name_the_same_seed_nodes() {
        for url in [
            "redis+cluster://user:pw@a:7000,b:7001/",
            "redis://user:pw@a:7000, redis://user:pw@b:7001",
        ] {
            let RedisTopology::Cluster(nodes) = RedisTopology::parse(url).unwrap() else {
                panic!("cluster: {url}")
            };
            let addresses: Vec<_> = nodes.iter().map(tcp).collect();
            assert_eq!(addresses, [("a".into(), 7000), ("b".into(), 7001)]);
            assert!(nodes
                .iter()
                .all(|n| n.redis.password.as_deref() == Some("pw")
                    && n.redis.username.as_deref() == Some("user")));
        }
        assert!(RedisTopology::parse("redis+cluster://a:7000/3").is_err());
        assert!(RedisTopology::parse("redis://a:7000,b:7001").is_err());
    }

    #[test]
    fn a_sentinel_url_names_the_master_and_keeps_credentials_for_it() {
        let RedisTopology::Sentinel {
            sentinels,
            master_name,
            master,
        } = RedisTopology::parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3").unwrap()
        else {
            panic!("sentinel")
        };
        assert_eq!(master_name, "mymaster");
        assert_eq!(
            sentinels.iter().map(tcp).collect::<Vec<_>>(),
            [("s1".into(), 26379), ("s2".into(), 26380)]
        );
        assert!(sentinels.iter().all(|s| s.redis.password.is_none()));
        assert_eq!(master.redis.db, 3);
        assert_eq!(master.redis.password.as_deref(), Some("pw"));
        assert!(RedisTopology::parse("redis+sentinel://s1:26379").is_err());
        assert!(RedisTopology::parse("redis+sentinel://s1:26379/m/x").is_err());
    }

    #[test]
    fn errors_never_repeat_the_url() {
        for url in [
            "http://:hunter2@x",
            "redis+cluster://:hunter2@a:1,,b:2",
            "redis+sentinel://:hunter2@s:1",
            "redis://:hunter2@a:1,http://b",
            "hunter2",
        ] {
            let error = RedisTopology::parse(url).err().expect(url);
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}

//! The broker behind PgBouncer, the connection pooler most PostgreSQL deployments put in front
//! of the server: Debian's PgBouncer with its defaults (session pooling, no
//! `ignore_startup_parameters`), between a broker and the test's database.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use url::Url;

use crate::helpers::*;
use crate::replicas::{free_port, TempDir};

/// A PgBouncer of its own, forwarding every database to the PostgreSQL of `DATABASE_URL`.
struct PgBouncer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl PgBouncer {
    fn start() -> Self {
        let server = Url::parse(&std::env::var("DATABASE_URL").expect("DATABASE_URL is set"))
            .expect("DATABASE_URL is a URL");
        let user = if server.username().is_empty() {
            "postgres"
        } else {
            server.username()
        };
        let port = free_port();
        let dir = TempDir::new("pgbouncer");
        let log = dir.0.join("pgbouncer.log");
        std::fs::write(dir.0.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        std::fs::write(
            dir.0.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host={host} port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {auth_file}\n\
                 pool_mode = session\n",
                host = server.host_str().unwrap_or("127.0.0.1"),
                server_port = server.port().unwrap_or(5432),
                auth_file = dir.0.join("userlist.txt").display(),
            ),
        )
        .unwrap();
        let binary = std::env::var_os("TOKEN_BROKER_PGBOUNCER")
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"));
        let mut command = Command::new(&binary);
        // PgBouncer refuses to run as root; as root (a container, CI) it is told to drop to
        // `nobody`, who must be able to read its directory.
        if running_as_root() {
            use std::os::unix::fs::PermissionsExt;
            for file in ["", "pgbouncer.ini", "userlist.txt"] {
                let path = dir.0.join(file);
                let mode = if file.is_empty() { 0o755 } else { 0o644 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(dir.0.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start PgBouncer ({}): {e}; scripts/test finds or installs it",
                    binary.display()
                )
            });
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "PgBouncer did not listen within 10 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// `url` (a database of the same server) through this PgBouncer.
    fn url_for(&self, url: &str) -> String {
        let mut url = Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn the_broker_works_through_pgbouncer_with_its_default_settings() {
    // Arrange: a broker whose DATABASE_URL is PgBouncer's (migrations at start-up included).
    let pgbouncer = PgBouncer::start();
    let app = spawn_app_with(|setup| {
        let direct = setup.settings.database_url.take().unwrap();
        setup.settings.database_url = Some(pgbouncer.url_for(&direct));
    })
    .await;

    // Act: a login; its session read from PostgreSQL (Redis emptied), with its access token;
    // a logout; a sweep.
    let mut browser = app.logged_in_browser("alice").await;
    delete_redis_keys(&app).await;
    let session = app.get_session(&browser).await;
    let auth = forward_auth(&app.http, &app.address, &browser).await;
    let logout = app.post_logout(&mut browser, Some(FRONTEND), true).await;
    let swept = app.broker.sweep_expired_sessions().await;

    // Assert: each worked, and went through PgBouncer to the test's database.
    assert_eq!(session.status(), 200);
    assert_eq!(auth.status(), 200);
    assert_eq!(logout.status(), 200);
    swept.expect("the sweep ran");
    assert_eq!(app.session_rows().await, 0);
    let log = pgbouncer.log();
    assert!(
        log.contains(&format!("{}/", app.database.name)) && !log.contains("unsupported"),
        "{log}"
    );
}

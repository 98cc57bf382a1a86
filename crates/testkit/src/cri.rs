//! The path kubelet takes: containerd's CRI plugin (`runtime.v1` over containerd's socket), with a blocking
//! client of the few calls the tests make (`proto/cri.proto`) and the containerd configuration that turns the
//! plugin on with lamina as its snapshotter.

use std::collections::HashMap;

use tonic::{transport::Channel, Status};

use super::containerd::Containerd;
use super::*;

/// Code generated from `proto/cri.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

use pb::image_service_client::ImageServiceClient;
use pb::runtime_service_client::RuntimeServiceClient;

/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";

impl Containerd {
    /// Turns containerd's CRI plugin on in the config of a containerd made with [`Containerd::new`] (before it
    /// starts): images unpacked into `snapshotter`, `sandbox_image` as the pause image, `registry` (`host:port`)
    /// reached over plain HTTP, runc's state below this containerd, and a CNI directory of its own (empty:
    /// pods run in the host's network namespace). The sandboxes' OOM score is not lowered below containerd's
    /// own (`restrict_oom_score_adj`): the default -998 needs a kernel that lets root lower it, and runc fails
    /// the sandbox ("can't get final child's PID from pipe") where writing it is refused, as on this machine.
    pub fn enable_cri(&self, snapshotter: &str, sandbox_image: &str, registry: &str) {
        let mut toml = fs::read_to_string(&self.config).unwrap();
        toml = toml.replace("\"io.containerd.grpc.v1.cri\", ", "");
        let q = |p: &Path| format!("{:?}", p.to_str().expect("utf-8 path"));
        let cni = self.dir.join("cni");
        fs::create_dir_all(cni.join("net.d")).unwrap();
        fs::create_dir_all(cni.join("bin")).unwrap();
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        toml.push_str(&format!(
            "[{cri}]\n  sandbox_image = {sandbox_image:?}\n  stream_server_address = \"127.0.0.1\"\n  \
             stream_server_port = \"0\"\n  enable_selinux = false\n  restrict_oom_score_adj = true\n\
             [{cri}.containerd]\n  snapshotter = {snapshotter:?}\n  default_runtime_name = \"runc\"\n\
             [{cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [{cri}.containerd.runtimes.runc.options]\n  Root = {}\n\
             [{cri}.cni]\n  bin_dir = {}\n  conf_dir = {}\n\
             [{cri}.registry.mirrors.{registry:?}]\n  endpoint = [\"http://{registry}\"]\n",
            q(&self.runc_root()),
            q(&cni.join("bin")),
            q(&cni.join("net.d")),
        ));
        fs::write(&self.config, toml).unwrap();
    }
}

/// A blocking CRI client on containerd's socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A pod config in the host's network, PID and IPC namespaces (no CNI needed).
pub fn host_pod(name: &str) -> pb::PodSandboxConfig {
    pb::PodSandboxConfig {
        metadata: Some(pb::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "lamina-e2e".into(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: String::new(),
        labels: HashMap::new(),
        annotations: HashMap::new(),
        linux: Some(pb::LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(pb::LinuxSandboxSecurityContext {
                namespace_options: Some(host_namespaces()),
            }),
        }),
    }
}

fn host_namespaces() -> pb::NamespaceOption {
    pb::NamespaceOption {
        network: pb::NamespaceMode::Node as i32,
        pid: pb::NamespaceMode::Pod as i32,
        ipc: pb::NamespaceMode::Pod as i32,
    }
}

impl Cri {
    /// Connects to containerd's GRPC socket.
    pub fn connect(c: &Containerd) -> Cri {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ch = rt
            .block_on(lamina_snapshotter::client::channel(&c.address))
            .unwrap_or_else(|e| panic!("connect {}: {e}", c.address.display()));
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(ch.clone()),
            images: ImageServiceClient::new(ch),
        }
    }

    /// `RuntimeService.Version`: the runtime's name and version.
    pub fn version(&self) -> Result<pb::VersionResponse, Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.version(pb::VersionRequest { version: "v1".into() }))
            .map(|r| r.into_inner())
    }

    /// `ImageService.PullImage` of `image`: the image reference containerd answers.
    pub fn pull(&self, image: &str) -> Result<String, Status> {
        let mut c = self.images.clone();
        let req = pb::PullImageRequest {
            image: Some(pb::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
            }),
            auth: None,
            sandbox_config: None,
        };
        self.rt
            .block_on(c.pull_image(req))
            .map(|r| r.into_inner().image_ref)
    }

    /// `RunPodSandbox` of `pod`: the sandbox id.
    pub fn run_pod(&self, pod: &pb::PodSandboxConfig) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let req = pb::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        };
        self.rt
            .block_on(c.run_pod_sandbox(req))
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// `CreateContainer` then `StartContainer` of a container `name` of `image` running `command` in the pod
    /// `pod_id` (made from `pod`): the container id.
    pub fn start_container(
        &self,
        pod_id: &str,
        pod: &pb::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let config = pb::ContainerConfig {
            metadata: Some(pb::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(pb::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: Vec::new(),
            working_dir: String::new(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
            log_path: String::new(),
            linux: Some(pb::LinuxContainerConfig {
                security_context: Some(pb::LinuxContainerSecurityContext {
                    namespace_options: Some(host_namespaces()),
                }),
            }),
        };
        let req = pb::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let id = self
            .rt
            .block_on(c.create_container(req))
            .map(|r| r.into_inner().container_id)?;
        self.rt.block_on(c.start_container(pb::StartContainerRequest {
            container_id: id.clone(),
        }))?;
        Ok(id)
    }

    /// `ExecSync` of `cmd` in container `id`: stdout, or the exit code and stderr.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<String, String> {
        let mut c = self.runtime.clone();
        let req = pb::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let r = self
            .rt
            .block_on(c.exec_sync(req))
            .map_err(|e| format!("exec in {id}: {e}"))?
            .into_inner();
        if r.exit_code != 0 {
            return Err(format!(
                "exec in {id} exited {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (its containers go with it).
    pub fn remove_pod(&self, pod_id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        self.rt.block_on(c.stop_pod_sandbox(pb::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        }))?;
        self.rt
            .block_on(c.remove_pod_sandbox(pb::RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            }))
            .map(|_| ())
    }
}

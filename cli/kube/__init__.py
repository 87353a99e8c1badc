"""The Kubernetes layer of the CLI: everything that knows the API server, KubeRay's objects or the cluster
config, and nothing that parses a command line or prints a table.

    client.py      one connected client per command: namespace, kubeconfig, API errors in words (403 hints),
                   the namespace's cluster config, the KubeRay release the cluster serves
    config.py      ClusterConfig: defaults, the llmctl-config ConfigMap's shape, validation, --env flags
    versions.py    the KubeRay and Kueue releases llmctl supports and what each serves
    pods.py        pod building shared by RayJob and RayService: containers, env, security, pod spec, labels
    rayjob.py      RunPlan + ClusterConfig -> the RayJob of a training run
    rayservice.py  a stored run + ClusterConfig -> the RayService of `llmctl serve`, and reading it back
    runs.py        RayJobs read back: get, describe in words, summary, create

The commands (cli/*.py) import these inside their functions, so building the parser imports none of them.
"""

// Wrapper module: builds the commands of the release required below (tools/kube/kubebin.py reads its version here).
module batchgen.local/kube/trainer

go 1.26.0

require github.com/kubeflow/trainer/v2 v2.3.0

tool github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager

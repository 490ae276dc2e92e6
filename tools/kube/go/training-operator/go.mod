// Wrapper module: builds the commands of the release required below (tools/kube/kubebin.py reads its version here).
module batchgen.local/kube/training-operator

go 1.26.0

require github.com/kubeflow/training-operator v1.9.3

tool github.com/kubeflow/training-operator/cmd/training-operator.v1

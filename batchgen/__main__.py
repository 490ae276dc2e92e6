from batchgen.cli import console

console()

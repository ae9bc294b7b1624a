"""The `alignd` command's subcommands, by concern; each module adds its commands to `alignd.commands.common.app`.

- `run`: the processes of a deployment — `up`, `serve`, `worker`, `beat`, `flower`, `keys`;
- `train`: `bootstrap` and `train sft|reward|cycle|ppo|dpo|kto`;
- `ops`: `versions`, `rollback`, `export`, `import`, `simulate`, `report`, `demo`;
- `config`: `config`, the training cycle's configuration tree.
"""

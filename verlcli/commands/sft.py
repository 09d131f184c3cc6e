"""`verl sft`: supervised fine-tuning on the same FSDP2 engine."""

from verlcli.commands.train import make_command

command = make_command(
    "sft",
    """Supervised fine-tuning (loss on assistant tokens only), full or LoRA.

    Examples:

      verl prepare-data gsm8k --source ../shared/data/gsm8k

      verl sft data.train_files=[data/gsm8k/sft_train.parquet] model.path=smollm2-135m-instruct

      verl sft --preset tiny-cpu model.lora.rank=8 sft.packing=true
    """,
)

"""Fine-tuning (`python -m spec_stream.finetune`, the entry point), one job per module:

- `config`: every setting (`FinetuneConfig`) and its checks, before any file is read;
- `inputs`: the output folder, the checkpoint to resume and the data, read and checked up front;
- `run`: the model, optimizer and schedule of a run (`Run`), restored when resuming;
- `batches`: left-padded, length-bucketed batches split across processes;
- `loop`: the loss, the training steps, checkpoints and the signals that stop a run;
- `evaluation`: the validation figures after training and the final save.
"""

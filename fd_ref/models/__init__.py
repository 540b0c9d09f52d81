"""Networks: fd-ref's BEiT-style ViT (:mod:`~fd_ref.models.vit`), frozen teachers (:mod:`~fd_ref.models.teachers`,
with hub access in :mod:`~fd_ref.models.hub`), any timm backbone (:mod:`~fd_ref.models.timm_backbone`), the
published SwinV2 initialisation and key map (:mod:`~fd_ref.models.swinv2_init`, :mod:`~fd_ref.models.swinv2_keys`),
the linear probe (:mod:`~fd_ref.models.probe`), the one way to rebuild a model from a file
(:mod:`~fd_ref.models.from_file`) and the network fine-tuning trains (:mod:`~fd_ref.models.finetune_model`)."""

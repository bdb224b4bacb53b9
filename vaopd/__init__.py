from vaopd.torchvision_ops import define_missing_torchvision_ops

define_missing_torchvision_ops()  # before anything imports transformers (see vaopd.torchvision_ops)

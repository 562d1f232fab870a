"""The installed environment: torch, torchvision, timm and the HF model families import and run together."""

import torch


def test_torchvision_ops_load_next_to_torch():
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]


def test_timm_model_runs():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bert_and_vit_classifiers_run():
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )
    assert bert(input_ids=torch.randint(0, 50, (2, 7))).logits.shape == (2, 3)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=4,
        )
    )
    assert vit(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 4)

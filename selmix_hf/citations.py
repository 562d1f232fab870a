"""BibTeX entries of the methods the library implements, by key: the model cards and the losses name them."""

from __future__ import annotations

CITATIONS: dict[str, str] = {
    "selmix": """@inproceedings{ramasubramanian2024selmix,
  title     = {Selective Mixup Fine-Tuning for Optimizing Non-Decomposable Objectives},
  author    = {Ramasubramanian, Shrinivas and Rangwani, Harsh and Takemori, Sho and Samanta, Kunal and
               Umeda, Yuhei and Radhakrishnan, Venkatesh Babu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}""",
    "autobalance": """@inproceedings{li2021autobalance,
  title     = {AutoBalance: Optimized Loss Functions for Imbalanced Data},
  author    = {Li, Mingchen and Zhang, Xuechen and Thrampoulidis, Christos and Chen, Jiasi and Oymak, Samet},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2021}
}""",
    "logit_adjusted": """@inproceedings{menon2021longtail,
  title     = {Long-tail learning via logit adjustment},
  author    = {Menon, Aditya Krishna and Jayasumana, Sadeep and Rawat, Ankit Singh and Jain, Himanshu and
               Veit, Andreas and Kumar, Sanjiv},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}""",
    "balanced_softmax": """@inproceedings{ren2020balanced,
  title     = {Balanced Meta-Softmax for Long-Tailed Visual Recognition},
  author    = {Ren, Jiawei and Yu, Cunjun and Sheng, Shunan and Ma, Xiao and Zhao, Haiyu and Yi, Shuai and
               Li, Hongsheng},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020}
}""",
    "fixmatch": """@inproceedings{sohn2020fixmatch,
  title     = {FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence},
  author    = {Sohn, Kihyuk and Berthelot, David and Li, Chun-Liang and Zhang, Zizhao and Carlini, Nicholas and
               Cubuk, Ekin D. and Kurakin, Alex and Zhang, Han and Raffel, Colin},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020}
}""",
    "ldam": """@inproceedings{cao2019ldam,
  title     = {Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss},
  author    = {Cao, Kaidi and Wei, Colin and Gaidon, Adrien and Arechiga, Nikos and Ma, Tengyu},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019}
}""",
    "class_balanced": """@inproceedings{cui2019classbalanced,
  title     = {Class-Balanced Loss Based on Effective Number of Samples},
  author    = {Cui, Yin and Jia, Menglin and Lin, Tsung-Yi and Song, Yang and Belongie, Serge},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019}
}""",
    "focal": """@inproceedings{lin2017focal,
  title     = {Focal Loss for Dense Object Detection},
  author    = {Lin, Tsung-Yi and Goyal, Priya and Girshick, Ross and He, Kaiming and Doll{\\'a}r, Piotr},
  booktitle = {IEEE International Conference on Computer Vision (ICCV)},
  year      = {2017}
}""",
    "vs": """@inproceedings{kini2021vs,
  title     = {Label-Imbalanced and Group-Sensitive Classification under Overparameterization},
  author    = {Kini, Ganesh Ramachandra and Paraskevas, Orestis and Oymak, Samet and Thrampoulidis, Christos},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2021}
}""",
    "plug_in": """@inproceedings{narasimhan2015consistent,
  title     = {Consistent Multiclass Algorithms for Complex Performance Measures},
  author    = {Narasimhan, Harikrishna and Ramaswamy, Harish G. and Saha, Aadirupa and Agarwal, Shivani},
  booktitle = {Proceedings of the 32nd International Conference on Machine Learning (ICML)},
  year      = {2015}
}""",
    "cost_sensitive": """@inproceedings{narasimhan2021nondecomposable,
  title     = {Training Over-parameterized Models with Non-decomposable Objectives},
  author    = {Narasimhan, Harikrishna and Menon, Aditya Krishna},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2021}
}""",
    "group_dro": """@inproceedings{sagawa2020groupdro,
  title     = {Distributionally Robust Neural Networks for Group Shifts: On the Importance of Regularization for
               Worst-Case Generalization},
  author    = {Sagawa, Shiori and Koh, Pang Wei and Hashimoto, Tatsunori B. and Liang, Percy},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2020}
}""",
}

__all__ = ["CITATIONS"]

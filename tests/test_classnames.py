"""Spot checks of CoOp's class names where public copies disagree."""

from dspt_jax.data import classnames as cn


def test_flowers_label_77_is_lotus():
    # Label 77 (0-based: tfds oxford_flowers102 label 77 "lotus"; cat_to_name.json key "78").
    # CoOp's runs take class names from split_zhou_OxfordFlowers.json (datasets/oxford_flowers.py reads
    # the split when it exists; cat_to_name.json only when generating a new split). That file says
    # "lotus": vishaal27/SuS-X generate_gpt3_prompts.py keys gpt3_prompts/CuPL_prompts_flowers102.json
    # by the split's classnames (dataloader.py, parse_image_paths), and that JSON has "lotus" at
    # index 77 and equals our list everywhere else; yangyangyang127/APE (extract_features.py,
    # prompts[classname] with classnames read from the split) ships the same keys. The CoOp-based
    # azshue/TPT data/cls_to_names.py has cat_to_name.json's key order with "78": "lotus". The
    # "lotus lotus" copies of cat_to_name.json are Udacity's (many aipnd-project forks).
    assert cn.OXFORD_FLOWERS[77] == "lotus"
    assert cn.OXFORD_FLOWERS[76:79] == ("passion flower", "lotus", "toad lily")
    assert "lotus lotus" not in cn.OXFORD_FLOWERS
    assert len(cn.OXFORD_FLOWERS) == 102 and len(set(cn.OXFORD_FLOWERS)) == 102

"""vlmerge.finetune"""

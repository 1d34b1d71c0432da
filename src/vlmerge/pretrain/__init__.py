"""vlmerge.pretrain"""

"""The special tokens of the released Idefics2 tokenizer (Mistral-7B-v0.1 SentencePiece plus
three added tokens): their text and their ids, defined here and nowhere else.

    id     text                         role
    0      <unk>                        unknown piece; also the padding id (the mask hides it)
    1      <s>                          begins every prompt
    2      </s>                         end of sequence: generation stops on it
    32000  <fake_token_around_image>    wraps each block of image tokens
    32001  <image>                      one slot per perceiver latent (64 per image)
    32002  <end_of_utterance>           ends every chat turn: generation stops on it
"""

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"

UNK_TOKEN_ID = PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
SENTENCEPIECE_VOCAB_SIZE = 32000  # the added tokens follow it
FAKE_IMAGE_TOKEN_ID = 32000
IMAGE_TOKEN_ID = 32001
END_OF_UTTERANCE_TOKEN_ID = 32002
VOCAB_SIZE = 32003

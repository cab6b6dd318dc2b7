"""Models: loading (`loading`), tiny random models (`tiny`), the local tokenizer
(`tokenizer`) and where routers and experts sit in a loaded model (`anatomy`)."""

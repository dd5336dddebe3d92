pub struct StoreError;
